"""What bounds a kernel and what a step costs (lessons 00-01): ``roofline``, ``flops``."""
