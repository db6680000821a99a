class ConversionError(ValueError):
    """The source cannot be converted; the message names the file or tensor at fault."""
