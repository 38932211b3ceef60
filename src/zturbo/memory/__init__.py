"""Memory: estimate and plan where the weights live, place them, stream them."""
