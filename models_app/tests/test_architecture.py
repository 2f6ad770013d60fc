"""The architecture viewer, built from each supported config (on the meta device)."""

import pytest

from models_app.ml.loading import count_parameters
from models_app.models import Model

pytestmark = pytest.mark.django_db

TINY_CONFIGS = {
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, vocab_size=1000, n_positions=128),
    "llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
    "mistral": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
    "qwen2": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
    "gemma": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=1000, max_position_embeddings=512),
    "phi": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, vocab_size=1000, max_position_embeddings=512),
    "phi3": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, vocab_size=1000, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "gpt_neox": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, vocab_size=1000, max_position_embeddings=512),
}  # fmt: skip
EXPECTED_PATHS = {
    "gpt2": ("transformer.h.1", "transformer.h.1.attn", "transformer.h.1.mlp"),
    "gpt_neox": ("gpt_neox.layers.1", "gpt_neox.layers.1.attention", "gpt_neox.layers.1.mlp"),
}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_the_viewer_shows_the_real_structure_of_each_supported_architecture(signed_in, model_type):
    config = {"model_type": model_type, **TINY_CONFIGS[model_type]}
    params = count_parameters(config)
    model = Model.objects.create(name=f"tiny-{model_type}", status="ready", architecture=model_type,
                                 architecture_config=config, params_count=params)  # fmt: skip
    html = signed_in.get(f"/models/{model.id}/architecture", HTTP_HX_REQUEST="true").content.decode()
    assert f"tiny-{model_type} Architecture" in html
    assert 'tile-layers">3<' in html and 'tile-hidden">64<' in html and 'tile-heads">4' in html
    assert "Shape: 1,000 × 64" in html and "Shape: 64 × 1,000" in html
    intermediate = 256 if model_type == "gpt2" else 176
    assert f"Attention: 4 heads × 16 dims | MLP: 64 → {intermediate} → 64" in html
    assert html.count("TransformerBlock_") == 3 and "TransformerBlock_2" in html
    block, attention, mlp = EXPECTED_PATHS.get(model_type, ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"))
    assert f"<code class=\"font-mono text-slate-300\">{block}</code>" in html
    assert f">{attention}<" in html and f">{mlp}<" in html
    assert html.count('hook-name font-mono text-emerald-400">residual<') == 3
    assert html.count(">attention</span>") == 3 and html.count(">mlp</span>") == 3
    assert f"&quot;model_type&quot;: &quot;{model_type}&quot;" in html  # the raw config

    api = signed_in.get(f"/api/models/{model.id}/architecture").json()
    assert api["tiles"] == {"layers": 3, "hidden": 64, "heads": 4, "parameters": params}
    hooked = {hook["name"]: sub["path"] for sub in api["layers"][2]["submodules"] for hook in sub["hooks"]}
    assert hooked == {"attention": attention, "mlp": mlp}
    kinds = [sub["kind"] for sub in api["layers"][2]["submodules"]]
    assert "Attention" in kinds and "MLP" in kinds and kinds.index("Attention") < kinds.index("MLP")  # the order they run


@pytest.mark.parametrize(
    ("model_type", "attention_hook", "mlp_hook", "shown", "diagram"),
    [
        ("gemma2", "post_attention_layernorm", "post_feedforward_layernorm", "Post-attention RMSNorm",
         {"parallel": False, "attention": "RMSNorm → Attention → RMSNorm", "mlp": "RMSNorm → MLP → RMSNorm"}),
        ("olmo2", "post_attention_layernorm", "post_feedforward_layernorm", "Post-MLP RMSNorm",
         {"parallel": False, "attention": "Attention → RMSNorm", "mlp": "MLP → RMSNorm"}),
        ("mixtral", "self_attn", "mlp", "MLP (4 experts)",
         {"parallel": False, "attention": "RMSNorm → Attention", "mlp": "RMSNorm → MLP (4 experts)"}),
        ("gpt_neox", "attention", "mlp", "parallel block",
         {"parallel": True, "attention": "LayerNorm → Attention", "mlp": "LayerNorm → MLP"}),
        ("granite", "self_attn", "mlp", "× 0.22",
         {"parallel": False, "attention": "RMSNorm → Attention → × 0.22", "mlp": "RMSNorm → MLP → × 0.22"}),
    ],
)  # fmt: skip
def test_the_viewer_shows_post_norms_experts_parallel_blocks_and_multipliers(signed_in, model_type, attention_hook,
                                                                             mlp_hook, shown, diagram):  # fmt: skip
    from transformers import AutoConfig

    from models_app.ml.decoder import tiny_config

    config = tiny_config({**AutoConfig.for_model(model_type).to_dict(), "model_type": model_type,
                          **({"residual_multiplier": 0.22} if model_type == "granite" else {})}).to_dict()  # fmt: skip
    config["model_type"] = model_type
    model = Model.objects.create(name=f"tiny-{model_type}", status="ready", architecture=model_type,
                                 architecture_config=config, params_count=count_parameters(config))  # fmt: skip
    view = signed_in.get(f"/api/models/{model.id}/architecture").json()
    block = view["layers"][1]
    hooked = {hook["name"]: sub["path"].rsplit(".", 1)[-1] for sub in block["submodules"] for hook in sub["hooks"]}
    assert hooked == {"attention": attention_hook, "mlp": mlp_hook}
    html = signed_in.get(f"/models/{model.id}/architecture", HTTP_HX_REQUEST="true").content.decode()
    assert shown in html
    # The block diagram: each branch as it runs, the hooks where the family really reads them.
    assert view["diagram"] == diagram
    assert f'data-parallel="{str(diagram["parallel"]).lower()}"' in html and diagram["mlp"] in html
    assert '<span class="text-slate-300 font-mono text-sm w-10 shrink-0 layer-label">L0</span>' in html


def test_the_viewer_shows_parameter_shapes_of_smollm2_blocks(signed_in, smollm2_folder):
    import json

    config = json.loads((smollm2_folder / "config.json").read_text())
    model = Model.objects.create(name="SmolLM2-135M", status="ready", architecture="llama", architecture_config=config,
                                 params_count=134_515_008)  # fmt: skip
    view = signed_in.get(f"/api/models/{model.id}/architecture").json()
    assert view["tiles"] == {"layers": 30, "hidden": 576, "heads": 9, "parameters": 134_515_008}
    attention = next(sub for sub in view["layers"][1]["submodules"] if sub["kind"] == "Attention")["parameters"]
    assert {"name": "k_proj.weight", "shape": [192, 576]} in attention  # 3 KV heads × 64 dims
    assert view["layers"][-1]["tied"] is True


def test_a_model_without_a_config_yet_gets_a_clear_refusal(signed_in):
    model = Model.objects.create(name="pending", status="downloading")
    response = signed_in.get(f"/api/models/{model.id}/architecture")
    assert response.status_code == 409 and "no config yet" in response.json()["error"]["message"]


def test_the_viewer_describes_experts_by_their_own_width_and_routing_and_gemma2s_attention_and_softcaps(signed_in):
    """Issue 19, item 8: qwen3_moe's MLP is its experts (moe_intermediate_size, top-k of N),
    not the dense intermediate_size; Gemma 2 alternates sliding-window and full attention
    and soft-caps its logits."""
    import html as html_module

    moe = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
           "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "max_position_embeddings": 512}  # fmt: skip
    model = Model.objects.create(name="tiny-moe", status="ready", architecture="qwen3_moe", architecture_config=moe,
                                 params_count=count_parameters(moe))  # fmt: skip
    view = signed_in.get(f"/api/models/{model.id}/architecture").json()
    assert "MLP: 8 experts, top-2 routing, each 64 → 32 → 64" in view["layers"][1]["detail"]
    assert "64 → 128 → 64" not in view["layers"][1]["detail"]
    assert view["summary"]["experts"] == "8 experts, top-2 routing, each 64 → 32 → 64" and view["summary"]["expert_ratio"] == 0.5
    page = html_module.unescape(signed_in.get(f"/models/{model.id}/architecture", HTTP_HX_REQUEST="true").content.decode())
    assert "Experts:" in page and "expert width 0.5× hidden" in page and "MLP Ratio" not in page

    gemma = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "max_position_embeddings": 512, "sliding_window": 256,
             "layer_types": ["sliding_attention", "full_attention"] * 2, "attn_logit_softcapping": 50.0,
             "final_logit_softcapping": 30.0}  # fmt: skip
    model = Model.objects.create(name="tiny-gemma2", status="ready", architecture="gemma2", architecture_config=gemma,
                                 params_count=count_parameters(gemma))  # fmt: skip
    view = signed_in.get(f"/api/models/{model.id}/architecture").json()
    details = [layer["detail"] for layer in view["layers"] if "block" in layer]
    assert ["sliding window of 256" in d for d in details] == [True, False, True, False]
    assert all("full" in d for d in details[1::2])
    assert view["summary"]["attention"] == "2 of 4 layers attend within a sliding window of 256 tokens, 2 attend to every earlier token"
    assert view["summary"]["softcaps"] == "attention logits 50, final logits 30"
    page = html_module.unescape(signed_in.get(f"/models/{model.id}/architecture", HTTP_HX_REQUEST="true").content.decode())
    assert "Logit soft-caps:" in page and "sliding window of 256" in page
