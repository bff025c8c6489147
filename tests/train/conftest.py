import pytest


class ByteTokenizer:
    """The tokenizer interface train/ codes against: bytes 0..255 shifted by 3; 0 pad, 1 bos, 2 eos."""

    pad_id, bos_id, eos_id = 2, 1, 2  # pad = eos, as the tutorial sets
    vocab_size = 259

    def encode(self, text, add_bos=True, add_eos=False):
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@pytest.fixture
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: with 2 shared cores, one intra-op thread is ~10x faster than two fighting for them."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
