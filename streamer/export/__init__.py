"""IPFIX export of the stream to existing flow collectors (`ctstream ipfix`)."""
