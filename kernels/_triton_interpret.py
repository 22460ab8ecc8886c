"""Make Triton's interpreter (TRITON_INTERPRET=1) work when `triton` was imported before the variable was set.

`@triton.jit` reads TRITON_INTERPRET when it decorates a function. triton.language's own helpers (tl.zeros,
tl.cdiv, the combine functions of tl.sum / tl.cumsum, …) are decorated when `triton` is first imported,
and that happens early and implicitly: transformers imports torch._dynamo, which imports triton. Setting
the variable afterwards turns our kernels into interpreted functions but leaves those helpers compiled,
and the interpreter then fails with "Cannot call @triton.jit'd outside of the scope of a kernel". This
module rebuilds them as interpreted functions, so the rule stays simply "set TRITON_INTERPRET=1 before
importing kernels.triton_moe".
"""

from __future__ import annotations

import sys


def make_triton_language_interpretable() -> None:
    """In interpreter mode, replace every compiled JITFunction in triton.language's modules by an
    InterpretedFunction of the same Python function. A no-op when not interpreting or already done."""
    from triton import knobs

    if not knobs.runtime.interpret:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpreted: dict[int, InterpretedFunction] = {}  # one replacement per function, shared by every alias
    language_modules = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m]
    for module in language_modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in interpreted:
                    interpreted[id(value)] = InterpretedFunction(value.fn)
                setattr(module, name, interpreted[id(value)])
