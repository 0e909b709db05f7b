"""The HTTP front door: validate, authenticate, admit into the buffer, answer with a receipt."""
