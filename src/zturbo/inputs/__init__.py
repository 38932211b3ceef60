"""Input images: decoding and checking them (`images`), what a request does with them (`spec`),
and the pixel work before the model sees them (`prepare`: resizing, masks, outpaint canvases,
control preprocessing, paste-back)."""
