"""course_lib: the shared library of the LLM-inference course.

Shape legend, used in every signature, comment and notebook of the course:

    B    batch size (number of sequences)
    S    sequence length (tokens in this forward pass);  Skv: tokens of keys/values (cache + new)
    Hq   query heads;  Hkv  key/value heads (GQA: Hq % Hkv == 0;  MQA: Hkv == 1)
    D    head dimension (head_dim)
    E    model (embedding) dimension: Hq * D, unless head_dim is set apart (Qwen3-0.6B: Hq * D = 2E)
    F    MLP hidden dimension
    V    vocabulary size
    L    number of layers
    P    tokens per KV block (block_size);  N  number of KV blocks

Importing this package resolves the device first, so that ``TRITON_INTERPRET=1`` is set before
Triton is imported on a machine without a GPU.
"""
from course_lib.device import DEVICE, HAS_GPU, INTERPRET, setup  # noqa: F401  (must come first)
from course_lib.config import PRESETS, ModelConfig  # noqa: F401,E402
from course_lib.model import Llama  # noqa: F401,E402
from course_lib.checkpoint import load_pretrained, load_tiny, save_pretrained  # noqa: F401,E402
from course_lib.tokenizer import Tokenizer  # noqa: F401,E402
