"""The user service: accounts, password hashes, login sessions and tokens, blocks, presence."""
