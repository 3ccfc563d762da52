"""allscope: sparse dictionaries on every layer of Gemma 3."""
