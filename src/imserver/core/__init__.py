"""The composition root: builds the services of a mode and runs the process around them."""
