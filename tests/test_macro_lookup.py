"""quick_macro_lookup: TVMScript macros find their parser by walking frames while our kernel
generators run; the kernels are the ones TVM's own lookup gives, and TVM's method comes back."""

import threading

import tvm_ffi
from tvm.script.parser.core.parser import ScriptMacro

from relax_masked_attn.kernels import cpu_dense, cuda_dense, cuda_norm
from relax_masked_attn.kernels.config import cpu_dense_tiles
from relax_masked_attn.kernels.epilogue import Epilogue
from relax_masked_attn.kernels.macro_lookup import quick_macro_lookup

ORIGINAL = ScriptMacro._find_parser_def

GENERATORS = [
    (cuda_dense.dense_kernel, (768, 768, "float16", Epilogue(bias=True, residual=True))),
    (cuda_dense.wgmma_dense_kernel, (2304, 768, "float16", Epilogue(True, split=(768,) * 3))),
    (cuda_norm.norm_kernel, ("rms", 128, "float16", 1e-6, 16)),
    (cpu_dense.dense_kernel, (384, 384, "float32", Epilogue(True, "gelu"),
                              cpu_dense_tiles("avx2"))),
]


def test_kernels_equal_those_of_tvms_own_lookup():
    for generator, args in GENERATORS:
        plain = generator.__wrapped__(*args)  # the generator itself: TVM's lookup
        assert ScriptMacro._find_parser_def is ORIGINAL
        with quick_macro_lookup():
            assert ScriptMacro._find_parser_def is not ORIGINAL
            quick = generator.__wrapped__(*args)
        assert tvm_ffi.structural_equal(plain, quick)
    assert ScriptMacro._find_parser_def is ORIGINAL


def test_nested_and_concurrent_users_share_it_and_give_it_back():
    with quick_macro_lookup():
        with quick_macro_lookup():
            pass
        assert ScriptMacro._find_parser_def is not ORIGINAL  # the outer block still runs
    assert ScriptMacro._find_parser_def is ORIGINAL
    results = {}

    def generate(index):
        generator, args = GENERATORS[index]
        with quick_macro_lookup():
            results[index] = generator.__wrapped__(*args)

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(GENERATORS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ScriptMacro._find_parser_def is ORIGINAL
    for index, (generator, args) in enumerate(GENERATORS):
        assert tvm_ffi.structural_equal(results[index], generator.__wrapped__(*args))
