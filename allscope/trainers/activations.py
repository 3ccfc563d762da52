"""JumpReLU and its Heaviside step with straight-through pseudo-derivatives.

Both use the rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps (Rajamanoharan et al. 2024,
as in Gemma Scope):
  jumprelu(z, t) = z * H(z - t):  d/dz = H(z - t),  d/dt = -(t / eps) K((z - t) / eps)
  step(z, t)     = H(z - t):      d/dz = 0,         d/dt = -(1 / eps) K((z - t) / eps)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def rectangle(u: jax.Array) -> jax.Array:
  return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, threshold: jax.Array, eps: float) -> jax.Array:
  return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, eps):
  return jumprelu(z, threshold, eps), (z, threshold)


def _jumprelu_bwd(eps, res, g):
  z, threshold = res
  dz = g * (z > threshold).astype(g.dtype)
  dt = -(threshold / eps) * rectangle((z - threshold) / eps) * g
  return dz, _unbroadcast(dt, threshold.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: jax.Array, threshold: jax.Array, eps: float) -> jax.Array:
  return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, eps):
  return step(z, threshold, eps), (z, threshold)


def _step_bwd(eps, res, g):
  z, threshold = res
  dt = -(1.0 / eps) * rectangle((z - threshold) / eps) * g
  return jnp.zeros_like(z), _unbroadcast(dt, threshold.shape)


step.defvjp(_step_fwd, _step_bwd)


def _unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums a broadcast cotangent back to `shape` (a threshold shared across rows)."""
  if x.shape == shape:
    return x
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead)))
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x
