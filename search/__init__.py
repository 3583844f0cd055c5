"""Search: text, image and more-like-this queries over a library."""
