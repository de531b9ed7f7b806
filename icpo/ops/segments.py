"""segment_mean and packing helpers: placeholder until the kernel lands."""
def segment_mean(values, cu_seqlens):
    raise NotImplementedError
def pack_padded(padded, mask):
    raise NotImplementedError
def unpack_to_padded(packed, cu_seqlens, padding_value=0):
    raise NotImplementedError
