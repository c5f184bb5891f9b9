"""Lean diffusion stack (DDPM/DDIM, OT-guided sampling); see issue 8."""
