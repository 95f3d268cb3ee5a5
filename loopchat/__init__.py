"""loopchat: an open, end-to-end ChatGPT-style system (SFT -> reward model -> PPO -> chat)."""

__version__ = "0.1.0"
