"""Every decoder-only family, exactly: tiny random models built in this process from each
family's own config (no downloads) go through the real extraction path, and the files it
writes must satisfy, up to float rounding,
- residual[i] == residual[i-1] + attention[i] + mlp[i] (residual[-1]: the embedding output
  as block 0 receives it, transformers' hidden_states[0]);
- residual[i] == hidden_states[i+1] of transformers' own forward pass, every block but the last.
Families that do not fit are refused from their config, with a reason that names why."""

import numpy as np
import pytest
import torch

from activations_app.ml.extract import ExtractionSpec, run_extraction
from activations_app.ml.tokens import Tokens
from activations_app.ml.hooks import HOOK_TYPES
from mistudio.errors import JobError
from models_app.ml import check_architecture, decoder

FAMILIES = [
    "gpt2", "gpt_bigcode", "gpt_neox", "phi", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe",
    "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "cohere",
]  # fmt: skip
PARALLEL = {"gpt_neox", "phi", "cohere"}
# What each sublayer's contribution is, as the families' code writes it.
EXPECTED_PARTS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": ("attn", "mlp"), "gpt_bigcode": ("attn", "mlp"), "gpt_neox": ("attention", "mlp"),
    "mixtral": ("self_attn", "mlp"), "qwen3_moe": ("self_attn", "mlp"),
}  # fmt: skip


def family_config(model_type: str) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    config["model_type"] = model_type
    if model_type == "granite":
        config["residual_multiplier"] = 0.22  # the multiplier must be in what is stored
    return config


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_family_satisfies_both_residual_identities_in_the_extracted_files(model_type, tmp_path):
    config = family_config(model_type)
    check_architecture(config)  # accepted from its config
    model = decoder.build_tiny(config)
    layers = decoder.find_blocks(model, model.config.num_hidden_layers)[1]
    n = len(layers)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(3, vocab, size=(3, 10)).astype(np.int64)
    spec = ExtractionSpec(layers=list(range(n)), hook_types=list(HOOK_TYPES), seq_len=10, batch_size=2, dtype="float32")
    result = run_extraction(model, model_type, Tokens(ids, None), spec, tmp_path / "out", {})
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), output_hidden_states=True, use_cache=False).hidden_states
    previous = hidden[0].double().numpy()

    def close(a, b, what):
        error = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert error < 1e-5, f"{model_type}: {what}: relative error {error:.2e}"

    for i in range(n):
        residual = np.load(result.output_dir / f"layer_{i}_residual.npy").astype(np.float64)
        attention = np.load(result.output_dir / f"layer_{i}_attention.npy").astype(np.float64)
        mlp = np.load(result.output_dir / f"layer_{i}_mlp.npy").astype(np.float64)
        assert residual.shape == attention.shape == mlp.shape == (3, 10, model.config.hidden_size)
        assert np.linalg.norm(attention) > 0 and np.linalg.norm(mlp) > 0
        close(residual, previous + attention + mlp, f"residual[{i}] = residual[{i - 1}] + attention + mlp")
        if i < n - 1:
            close(residual, hidden[i + 1].double().numpy(), f"residual[{i}] = hidden_states[{i + 1}]")
        previous = residual
    verdict = decoder.judge_config(config)
    assert verdict.layout.parallel is (model_type in PARALLEL)
    if model_type in EXPECTED_PARTS:
        part = verdict.layout.blocks[0]
        assert (part.attention.path, part.mlp.path) == EXPECTED_PARTS[model_type]
    scales = {(p.attention.scale, p.mlp.scale) for p in verdict.layout.blocks}
    assert scales == ({(0.22, 0.22)} if model_type == "granite" else {(1.0, 1.0)}), scales


def test_granite_contributions_carry_its_residual_multiplier(tmp_path):
    """Without the multiplier, attention[i] would be 1/0.22 of what the block adds."""
    config = family_config("granite")
    model = decoder.build_tiny(config)
    block = model.model.layers[0]
    seen = {}
    def record(_m, _i, out):
        seen["raw"] = out[0].detach().clone()  # the last call: the extraction's only batch (the probe's runs first)

    handle = block.self_attn.register_forward_hook(record)
    ids = np.random.default_rng(1).integers(3, 500, size=(1, 8)).astype(np.int64)
    spec = ExtractionSpec(layers=[0], hook_types=["attention"], seq_len=8, batch_size=1, dtype="float32")
    try:
        result = run_extraction(model, "granite", Tokens(ids, None), spec, tmp_path / "out", {})
    finally:
        handle.remove()
    stored = np.load(result.output_dir / "layer_0_attention.npy")
    np.testing.assert_allclose(stored, 0.22 * seen["raw"].numpy(), rtol=1e-5, atol=1e-7)


def lfm2_hybrid() -> dict:
    config = family_config("lfm2")
    config.update(num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"])
    config.pop("full_attn_idxs", None)
    return config


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (lambda: lfm2_hybrid(), "mixes tokens with conv (Lfm2ShortConv), not attention"),
        (lambda: family_config("mamba"), "no two of its sublayers add up"),
        (lambda: family_config("t5"), "t5 is an encoder-decoder model"),
        (lambda: family_config("bert"), "bert is an encoder-only"),
    ],
    ids=["lfm2", "mamba", "t5", "bert"],
)
def test_a_family_that_does_not_fit_is_refused_from_its_config_with_the_reason(config, reason):
    with pytest.raises(JobError) as refused:
        check_architecture(config())
    assert refused.value.code == "unsupported_architecture"
    assert reason in refused.value.message, refused.value.message


def test_a_pythia_checkpoint_with_its_head_stored_as_embed_out_is_accepted(tmp_path):
    """GPT-NeoX checkpoints store the LM head as `embed_out.weight`, and transformers saves it
    so too: the checkpoint is judged by transformers' own loading report, not by name."""
    from models_app.ml import loading

    config = family_config("gpt_neox")
    model = decoder.build_tiny(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert "embed_out.weight" in handle.keys()
    facts = loading.inspect_model(tmp_path)
    assert facts.architecture == "gpt_neox" and facts.params_count == sum(p.numel() for p in model.parameters())
