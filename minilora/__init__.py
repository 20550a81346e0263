"""minilora: an educational, autograd-free GPT in NumPy (CuPy by one switch), with LoRA,
SVD analysis of ΔW, and NF4 / double quantisation / QLoRA built step by step."""
__version__ = "0.1.0"
