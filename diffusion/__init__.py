"""mmskip.diffusion"""
