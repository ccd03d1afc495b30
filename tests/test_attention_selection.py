"""Which attention backend runs, and why (ops/attention.py: select, route); the required-backend error.

There is no GPU here, so GPU availability is simulated: a Hopper is a `capability=(9, 0)` argument, and the
FlashAttention modules are stand-ins on sys.path that compute attention with SDPA -- a local
`flash_attn_interface`, a fake Hugging Face `kernels` hub package (a real distribution with metadata, whose
get_kernel records the repository asked for), and `flash_attn.cute` for FA4. The hub package's top-level name
`kernels` must import beside ours (`ops`) with no sys.modules juggling: that is checked in a fresh interpreter.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ops import attention as A

REPO_ROOT = Path(__file__).resolve().parents[1]
HOPPER, AMPERE = (9, 0), (8, 0)

SDPA_FLASH = textwrap.dedent("""
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, causal=True, window_size=(-1, 0), **kwargs):
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return y.transpose(1, 2)
""")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path for stand-in packages; whatever got imported from it is forgotten afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    names = ("flash_attn_interface", "kernels", "flash_attn", "flash_attn.cute")
    yield root
    for name in names:
        sys.modules.pop(name, None)


def write_fake_hub(root: Path) -> None:
    """Hugging Face's `kernels` package as a stand-in: a distribution (dist-info) whose get_kernel(repo) logs
    the repository and returns a module with an SDPA flash_attn_func."""
    (root / "kernels").mkdir()
    (root / "kernels" / "__init__.py").write_text(textwrap.dedent("""
        import types
        REQUESTED = []

        def get_kernel(repo):
            REQUESTED.append(repo)
            module = types.ModuleType("flash_attn_interface")
            exec(SOURCE, module.__dict__)
            return module
    """) + f"SOURCE = {SDPA_FLASH!r}\n")
    info = root / "kernels-0.17.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")


def test_auto_on_cpu_is_sdpa_and_says_why():
    selection, module = A.select("auto", "cpu")
    assert (selection.backend, module) == ("sdpa", None) and "CPU" in selection.reason.upper()
    assert selection.as_dict() == {"attention_backend": "sdpa", "attention_requested": "auto",
                                   "attention_reason": selection.reason}


@pytest.mark.parametrize("requested", ["fused", "fa3", "fa4"])
def test_fused_request_without_a_gpu_fails_naming_the_option_and_the_install(requested):
    with pytest.raises(A.AttentionUnavailable) as err:
        A.select(requested, "cpu")
    message = str(err.value)
    assert f"runtime.attention={requested}" in message and 'pip install -e ".[gpu]"' in message
    assert "runtime.attention=auto" in message  # the other way out


def test_unknown_request_names_the_choices():
    with pytest.raises(A.AttentionUnavailable, match="one of auto, fused, fa3, fa4, flex, sdpa"):
        A.select("xformers", "cpu")


def test_hopper_without_kernels_auto_is_flex_and_says_what_is_missing(site):
    selection, _ = A.select("auto", "cuda", capability=HOPPER)
    assert selection.backend == "flex"
    assert "fa3:" in selection.reason and "fa4:" in selection.reason and ".[gpu]" in selection.reason
    with pytest.raises(A.AttentionUnavailable, match="no fused attention kernel loads here"):
        A.select("fused", "cuda", capability=HOPPER)


def test_local_flash_attn_interface_gives_fa3_on_hopper_only(site):
    (site / "flash_attn_interface.py").write_text(SDPA_FLASH)
    for requested in ("auto", "fused", "fa3"):
        selection, module = A.select(requested, "cuda", capability=HOPPER)
        assert selection.backend == "fa3" and module.__name__ == "flash_attn_interface"
    ampere, _ = A.select("auto", "cuda", capability=AMPERE)
    assert ampere.backend == "flex" and "sm80" in ampere.reason  # FA3 is Hopper-only: said, not silently skipped


def test_fa4_when_fa3_is_missing(site):
    (site / "flash_attn" / "cute").mkdir(parents=True)
    (site / "flash_attn" / "cute" / "__init__.py").write_text(SDPA_FLASH)
    selection, module = A.select("fused", "cuda", capability=HOPPER)
    assert selection.backend == "fa4" and "fa3:" in selection.reason  # why not the better one
    assert A.select("fa4", "cuda", capability=(10, 0))[0].backend == "fa4"


def test_hub_kernels_package_serves_fa3_and_coexists_with_ops(site):
    """The hub package and ours import side by side in one fresh interpreter; FA3 comes from the hub build the
    reference uses on Hopper."""
    write_fake_hub(site)
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(site)!r})
        import kernels                      # Hugging Face's hub package
        from ops import attention, fp8      # ours
        from importlib import metadata
        selection, module = attention.select("fa3", "cuda", capability=(9, 0))
        print(json.dumps({{"hub": kernels.__file__, "ops": attention.__file__, "backend": selection.backend,
                          "requested": kernels.REQUESTED, "dist": metadata.version("kernels"),
                          "same_hub": sys.modules["kernels"] is kernels}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hub"].startswith(str(site)) and out["ops"].startswith(str(REPO_ROOT / "ops"))
    assert out["backend"] == "fa3" and out["requested"] == ["varunneal/flash-attention-3"]
    assert out["dist"] == "0.17.2" and out["same_hub"]


@pytest.mark.parametrize("backend,cuda,dtype,compiling,forced,expected", [
    ("fa3", True, torch.bfloat16, False, False, "fa3"),   # eval, CORE, engine: the fused kernel
    ("fa3", True, torch.bfloat16, True, False, "fa3"),
    ("fa3", True, torch.float32, True, False, "flex"),    # fp32 on CUDA: not for FA3
    ("fa3", True, torch.float32, False, False, "sdpa"),
    ("fa4", True, torch.float16, False, False, "fa4"),
    ("flex", True, torch.bfloat16, True, False, "flex"),  # traced into the compiled model: fused
    ("flex", True, torch.bfloat16, False, False, "sdpa"),  # never unfused FlexAttention on a GPU
    ("flex", True, torch.bfloat16, False, True, "flex"),  # unless a test forces it
    ("sdpa", True, torch.bfloat16, True, False, "sdpa"),
    ("fa3", False, torch.float32, False, False, "sdpa"),  # CPU
    ("flex", False, torch.float32, False, False, "flex"),
])
def test_route(backend, cuda, dtype, compiling, forced, expected):
    assert A.route(backend, cuda=cuda, dtype=dtype, compiling=compiling, forced=forced) == expected


def test_flex_is_traced_into_compiled_code_and_no_compiled_handle_is_kept():
    """FlexAttention reaches the compiled graph as the flex_attention op (fused by inductor on a GPU), and no
    module-level compiled handle exists to end up the raw function when first reached inside a trace."""
    q = torch.randn(1, 64, 2, 16)
    k, v = torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16)

    def attend(q, k, v):
        return A.flash_attn_func(q, k, v, causal=True, window_size=(16, 0))

    A.set_backend_override("flex")
    try:
        explained = torch._dynamo.explain(attend)(q, k, v)
        graphs = "\n".join(str(g.graph) for g in explained.graphs)
        assert "flex_attention" in graphs and explained.graph_break_count == 0
        compiled = torch.compile(attend, backend="eager", fullgraph=True)(q, k, v)
    finally:
        A.set_backend_override(None)
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, attend(q, k, v), atol=1e-5, rtol=0)  # vs SDPA, eager
    assert not [name for name in vars(A) if "compiled" in name.lower()]


def test_flow_fails_before_any_stage_when_the_requested_backend_is_missing(shared_data):
    """`--set runtime.attention=fa3` on a machine without FA3: an error naming the option and the install,
    in seconds, before Prefect starts."""
    proc = subprocess.run([sys.executable, "-m", "flows.speedrun", "--preset", "smoke", "--mirror", str(shared_data),
                           "--set", "runtime.attention=fa3"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "runtime.attention=fa3" in proc.stderr and 'pip install -e ".[gpu]"' in proc.stderr
    assert "Starting temporary server" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_entry_point_records_its_backend(tmp_path):
    """model.* entry points say which backend runs and why (setup_attention), and refuse one they cannot run."""
    from model.common import setup_attention

    said = []
    info = setup_attention("auto", "cpu", said.append)
    assert info["attention_backend"] == "sdpa" and said == [f"attention: sdpa ({info['attention_reason']})"]
    with pytest.raises(SystemExit, match="--attention fused: .*pip install"):
        setup_attention("fused", "cpu", said.append)
    A.configure("auto", "cpu")
