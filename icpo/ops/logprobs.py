"""token_logprobs: placeholder until the kernel lands."""
def token_logprobs(logits, labels, *, temperature=1.0, return_entropy=True, ignore_index=-100):
    raise NotImplementedError
