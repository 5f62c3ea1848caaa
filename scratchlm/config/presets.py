"""Named presets: functions that start from the defaults (or from another preset) and change a few
fields. `scratchlm <verb> --preset NAME`; `get_preset(name)` suggests close names for a typo."""

from __future__ import annotations

from collections.abc import Callable

from scratchlm.config.fields import suggest
from scratchlm.config.model import GPTConfig, LlamaConfig, switch_arch
from scratchlm.config.sections import Config
from scratchlm.errors import UserError

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


@preset
def default() -> Config:
    return Config()


@preset
def tiny() -> Config:
    """The demo scale: a small BPE on the embedded corpus, trained in seconds on a laptop."""
    cfg = Config(name="tiny", out_dir="runs/tiny")
    cfg.tokenizer.vocab_size = 2048
    cfg.model = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64)
    t = cfg.train
    t.batch_size, t.max_steps, t.warmup_steps, t.lr, t.min_lr = 16, 600, 50, 2e-3, 2e-4
    t.eval_interval, t.eval_iters, t.ckpt_interval = 200, 10, 0
    cfg.sample.max_new_tokens = 40
    return cfg


def _shakespeare_char_data(cfg: Config) -> Config:
    """nanoGPT's shakespeare_char data: characters, one document, the last 10% for validation."""
    cfg.tokenizer.kind = "char"
    cfg.tokenizer.special_tokens = []
    cfg.data.val_fraction = 0.1
    cfg.data.dedup = False
    cfg.data.min_chars = 0
    cfg.data.max_repeated_line_ratio = 1.0
    return cfg


@preset
def char_tiny() -> Config:
    """nanoGPT's CPU "baby" shakespeare_char run: 4 layers, 4 heads, 128 dims, block 64, 2,000 steps,
    batch 12, dropout 0. nanoGPT uses lr 1e-3 -> 1e-4 and reaches a validation loss of about 1.88;
    the same model and steps at 2e-3 -> 2e-4 reach 1.82 here (bench/shakespeare_char.py)."""
    cfg = _shakespeare_char_data(Config(name="char-tiny", out_dir="runs/char-tiny"))
    cfg.train.lr, cfg.train.min_lr, cfg.train.max_steps = 2e-3, 2e-4, 2000
    return cfg


@preset
def shakespeare_char() -> Config:
    """nanoGPT's GPU shakespeare_char model: 6 layers, 6 heads, 384 dims, block 256, dropout 0.2."""
    cfg = _shakespeare_char_data(Config(name="shakespeare-char", out_dir="runs/shakespeare-char"))
    cfg.model = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2)
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.warmup_steps = 64, 5000, 100
    return cfg


@preset
def gpt2_124m() -> Config:
    """GPT-2 small: 12 layers, 12 heads, 768 dims, block 1024, vocab 50,257 padded to 50,304."""
    cfg = Config(name="gpt2-124m", out_dir="runs/gpt2-124m")
    cfg.model = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, pad_vocab_to=64)
    t = cfg.train
    t.batch_size, t.grad_accum, t.lr, t.min_lr, t.beta2 = 8, 64, 6e-4, 6e-5, 0.95
    t.warmup_steps, t.max_steps = 700, 20_000
    return cfg


def _llama(cfg: Config, n_layer: int, n_head: int, n_kv_head: int, n_embd: int, block: int) -> Config:
    cfg.model = LlamaConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, block_size=block,
                            bias=False, dropout=0.0)
    return cfg


@preset
def llama_tiny() -> Config:
    """A Llama-family model at demo scale: 4 layers, 4 query heads sharing 2 key/value heads, 128 dims."""
    cfg = _llama(tiny(), 4, 4, 2, 128, 64)
    cfg.name, cfg.out_dir = "llama-tiny", "runs/llama-tiny"
    return cfg


@preset
def llama_30m() -> Config:
    """About 30M parameters: 8 layers, 8 heads, 4 key/value heads, 512 dims, context 512."""
    cfg = _llama(Config(name="llama-30m", out_dir="runs/llama-30m"), 8, 8, 4, 512, 512)
    cfg.tokenizer.vocab_size = 8192
    return cfg


@preset
def llama_125m() -> Config:
    """A Llama-style ~125M model: 12 layers, 12 heads, 4 key/value heads, 768 dims, context 1024."""
    cfg = _llama(Config(name="llama-125m", out_dir="runs/llama-125m"), 12, 12, 4, 768, 1024)
    cfg.tokenizer.vocab_size = 32768
    t = cfg.train
    t.batch_size, t.grad_accum, t.lr, t.min_lr, t.beta2 = 8, 64, 6e-4, 6e-5, 0.95
    t.warmup_steps, t.max_steps = 700, 20_000
    return cfg


@preset
def moe_tiny() -> Config:
    """The demo's MoE: llama-tiny with 8 experts, top-2, each expert half the dense FFN, so the
    active parameters per token equal the dense model's."""
    cfg = llama_tiny()
    cfg.name, cfg.out_dir = "moe-tiny", "runs/moe-tiny"
    cfg.model = switch_arch(cfg.model, "moe")
    return cfg


@preset
def mla_tiny() -> Config:
    """DeepSeek-V3 at demo scale: llama-tiny's width and depth with multi-head latent attention (a 32-wide
    cached latent + a 16-wide RoPE key per token and layer, against llama-tiny's 2 x 2 x 32), the first
    layer dense, then 4 sigmoid-routed experts (top 2) plus one shared expert."""
    cfg = llama_tiny()
    cfg.name, cfg.out_dir = "mla-tiny", "runs/mla-tiny"
    m = switch_arch(cfg.model, "mla")
    m.n_kv_head, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 0, 32, 32, 16, 32
    m.n_experts, m.n_active_experts, m.n_shared_experts, m.moe_first_dense = 4, 2, 1, 1
    m.expert_hidden, m.router = 128, "sigmoid"
    cfg.model = m
    return cfg


@preset
def mtp_tiny() -> Config:
    """mla-tiny with two multi-token prediction depths (loss weight 0.3), which also draft for
    speculative decoding."""
    cfg = mla_tiny()
    cfg.name, cfg.out_dir = "mtp-tiny", "runs/mtp-tiny"
    cfg.model.mtp_depth, cfg.model.mtp_loss_weight = 2, 0.3
    return cfg


@preset
def diff_tiny() -> Config:
    """llama-tiny with differential attention: its 4 query heads form 2 pairs (two softmax maps each),
    its 2 key/value heads 1 pair of 2D-wide values; the same parameters plus λ's 4 x 32 per layer."""
    cfg = llama_tiny()
    cfg.name, cfg.out_dir = "diff-tiny", "runs/diff-tiny"
    cfg.model = switch_arch(cfg.model, "diff")
    return cfg


@preset
def diff_nonorm_tiny() -> Config:
    """An ablation of diff-tiny: its per-pair RMSNorm on the attention output left out (model.sub_norm=false).
    That norm sets the attention branch to unit scale (about 13x llama-tiny's output at init), which holds
    diff-tiny on the unigram plateau for most of a short run; this preset measures that cost."""
    cfg = diff_tiny()
    cfg.name, cfg.out_dir = "diff-nonorm-tiny", "runs/diff-nonorm-tiny"
    cfg.model.sub_norm = False
    return cfg


@preset
def jamba_tiny() -> Config:
    """The Jamba hybrid at demo scale: llama-tiny's 4 layers and 128 dims as Mamba, Mamba, attention,
    Mamba (one attention layer in 4, at index 2), the odd layers' feed-forwards 8 experts (top 2, each
    half the dense FFN); state size 16, conv width 4, inner width 256."""
    cfg = llama_tiny()
    cfg.name, cfg.out_dir = "jamba-tiny", "runs/jamba-tiny"
    cfg.model = switch_arch(cfg.model, "jamba")
    return cfg


@preset
def nsa_tiny() -> Config:
    """llama-tiny with native sparse attention: compressed blocks of 8 tokens every 4, the top 4 of the
    8-token blocks in full (the first and the query's own among them), a 16-token window."""
    cfg = llama_tiny()
    cfg.name, cfg.out_dir = "nsa-tiny", "runs/nsa-tiny"
    cfg.model = switch_arch(cfg.model, "nsa")
    return cfg


@preset
def sft_tiny() -> Config:
    """Fine-tuning the demo's model on the embedded tasks: 1,500 steps on 10,000 generated tasks took the
    demo's 1M GPT from 10% held-out exact match (300 steps on 3,000 tasks) to 65% in 2 minutes, with room
    left on add, repeat and reverse for the alignment and RL stages that follow."""
    cfg = tiny()
    cfg.name, cfg.out_dir = "sft-tiny", "runs/sft-tiny"
    cfg.sft.n_tasks = 10_000
    t = cfg.train
    t.max_steps, t.lr, t.min_lr, t.warmup_steps, t.eval_interval, t.eval_iters = 1500, 1e-3, 1e-4, 20, 500, 5
    t.weight_decay = 0.0
    return cfg


@preset
def rm_tiny() -> Config:
    """The demo's reward model: the SFT policy's trunk with a score head and the likelihood term
    (`rm.likelihood`), trained on embedded pairs from 4,000 prompts. bench/rm.py measured, on the
    1M-parameter 36% demo policy, same pairs: 300 steps at lr 1e-4 reach 90.0% held out, 1,500 steps
    87.3%, and 300 at lr 1e-3 83.0% (the larger steps wear down the LM head's knowledge). The head
    alone (--rm.likelihood=false) was tuned at lr 1e-3 and 1,500 steps, and stays near 70%."""
    cfg = sft_tiny()
    cfg.name, cfg.out_dir = "rm-tiny", "runs/rm-tiny"
    cfg.pref.n_prompts = 4000
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.min_lr, t.warmup_steps, t.eval_interval = 300, 16, 1e-4, 1e-5, 20, 100
    return cfg


@preset
def dpo_tiny() -> Config:
    """DPO on the demo's SFT policy with its own on-policy pairs, plus the chosen answers' NLL (RPO):
    plain DPO lowered the policy's exact match on these near-miss pairs (bench/dpo.py measured these
    settings, at lr 3e-4 on its weaker policy: 6,000 prompts sampled at 0.7 give about 2,000 pairs). lr 1e-4:
    on the demo's 65% SFT policy 3e-4 cost 5 points of held-out exact match (66.8% -> 61.8%), 1e-4 none."""
    cfg = sft_tiny()
    cfg.name, cfg.out_dir = "dpo-tiny", "runs/dpo-tiny"
    cfg.pref.kind, cfg.pref.n_prompts, cfg.pref.temperature = "on_policy", 6000, 0.7
    cfg.dpo.beta, cfg.dpo.rpo_alpha = 0.1, 1.0
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.min_lr, t.warmup_steps, t.eval_interval = 300, 16, 1e-4, 1e-5, 10, 100
    return cfg


@preset
def rl_base() -> Config:
    """The policy bench/rl.py measures RL on: a 2-layer, 64-dim Llama (230k parameters), pretrained 600
    steps. Its SFT (`rl-base-sft`) leaves add with headroom (held out: greedy 13-15%, pass@8 55-60%).
    Sizes from 96k to 1M parameters were measured: trained to a plateau, every one solves sort (97-100%
    greedy) and add (>= 90%), leaving RL nothing to find; short of it, add jumps from ~10% to ~80% within
    a few hundred steps at a point that moves with the run (here, in fp32, it had not yet come). fp32:
    "auto" measures bf16 per machine, and the two precisions give different policies."""
    cfg = llama_tiny()
    cfg.name, cfg.out_dir = "rl-base", "runs/rl-base"
    m = cfg.model
    m.n_layer, m.n_head, m.n_kv_head, m.n_embd, m.block_size = 2, 2, 1, 64, 256
    cfg.train.max_steps, cfg.train.eval_interval, cfg.train.batch_size = 600, 600, 8
    cfg.train.precision = "fp32"
    return cfg


@preset
def rl_base_sft() -> Config:
    """SFT of `rl-base`: 2,000 steps of 16 on 20,000 embedded tasks at lr 2e-3, in fp32."""
    cfg = sft_tiny()
    cfg.name, cfg.out_dir = "rl-base-sft", "runs/rl-base-sft"
    cfg.sft.n_tasks = 20_000
    cfg.train.precision = "fp32"
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.min_lr, t.eval_interval = 2000, 16, 2e-3, 2e-4, 500
    return cfg


@preset
def grpo_tiny() -> Config:
    """GRPO with the task checkers as reward: 16 prompts x 8 answers per rollout, one update per rollout,
    the k3 KL term at beta 0.04 (DeepSeekMath's). lr 3e-5: on bench/rl.py's policy 3e-5 raised held-out
    add from 76.6% to 81.2% in 300 updates where 1e-4 lowered it (74.8%); 3e-4 and 1e-3 wrecked the demo's
    policy within 20 updates (KL 2.5 and 12 nats per answer): Adam moves every weight by about lr per
    step, whatever the noise in the gradient."""
    cfg = sft_tiny()
    cfg.name, cfg.out_dir = "grpo-tiny", "runs/grpo-tiny"
    cfg.rl.algo = "grpo"
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.min_lr, t.warmup_steps, t.log_interval = 300, 32, 3e-5, 3e-5, 10, 1
    t.grad_clip = 1.0
    return cfg


@preset
def ppo_tiny() -> Config:
    """PPO on the demo's SFT policy: 64 prompts x 1 answer per rollout, 2 epochs of 2 minibatches, the
    value head on the policy's trunk, the adaptive KL controller (horizon 200 answers) steering the KL to
    the SFT policy towards 1 nat per answer. bench/rl.py: at lr 1e-4 (horizon 1,000) the KL ran to 9 nats
    and held-out accuracy fell 28 points while the reward model's score rose (reward hacking)."""
    cfg = grpo_tiny()
    cfg.name, cfg.out_dir = "ppo-tiny", "runs/ppo-tiny"
    r = cfg.rl
    r.algo, r.prompts, r.group, r.epochs, r.minibatches = "ppo", 64, 1, 2, 2
    r.kl_coef, r.kl_control, r.kl_target, r.kl_horizon = 0.1, "adaptive", 1.0, 200
    cfg.train.max_steps = 200
    return cfg


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}", fix=suggest(name, PRESETS, "presets"))
    return PRESETS[name]()
