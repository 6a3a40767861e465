"""`python -m diffquant` (used by `accelerate launch -m diffquant`)."""

from diffquant.cli import main

if __name__ == "__main__":
    main()
