#!/usr/bin/env bash
# The real-model figures of the closing notes, reproducible: run after `posttrain demo` (it needs runs/demo/sft/final).
#   bash scripts/real_model_experiments.sh preference   # DPO, IPO, SimPO, ORPO, KTO from the demo's SFT model
#   bash scripts/real_model_experiments.sh grpo [KEY=VALUE ...]  # GRPO with the numeric verifier, 26 min of training
#   bash scripts/real_model_experiments.sh ppo [KEY=VALUE ...]   # RMs on the SFT model's own samples, then PPO
#   bash scripts/real_model_experiments.sh overopt      # posttrain demo --overopt
#   bash scripts/real_model_experiments.sh rl2025       # GRPO with clip / gspo / cispo at one budget, then
#                                                       # on-policy distillation of the clip model into SFT
#   bash scripts/real_model_experiments.sh tools        # SFT on calculator demonstrations, then GRPO with the tool
#     (SFT_STEPS=4 SFT_LR=4e-5 leaves the SFT model at ~30 % with the tool: room for GRPO; 12 steps saturate it)
# Each run writes runs/exp/NAME; `held-out accuracy` is `posttrain eval` (greedy) on 64 test prompts (256 for ppo).
set -euo pipefail
cd "$(dirname "$0")/.."
PT=.venv/bin/posttrain
SFT=runs/demo/sft/final
COMMON=(model.autocast=auto train.progress=false train.log_every=1 train.save_every=0 data.max_length=160
        data.num_eval_examples=64)

heldout() {  # model -> prints numeric accuracy on $HELDOUT_LIMIT (64) held-out prompts
  $PT eval --model "$1" --data task:arithmetic --reward numeric --limit ${HELDOUT_LIMIT:-64} --max-new-tokens 24 \
    --output "$1/../heldout.jsonl" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["numeric/accuracy"])'
}

preference() {
  echo "start (SFT) held-out accuracy: $(heldout $SFT)"
  for loss in dpo ipo simpo orpo; do
    extra=()
    [ "$loss" = simpo ] && extra=(algo.beta=2.0 algo.simpo_gamma=1.0)
    [ "$loss" = ipo ] && extra=(algo.beta=0.5)
    $PT dpo --model $SFT --data task:arithmetic --output-dir runs/exp/$loss "${COMMON[@]}" algo.loss_type=$loss \
      train.max_steps=32 train.batch_size=4 train.lr=2e-5 data.num_examples=128 "${extra[@]}" > runs/exp.$loss.log 2>&1
    echo "$loss: $(python3 - runs/exp/$loss <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
final = [r for r in rows if r.get("final")][-1]
print(f"held-out pairwise acc {final.get('eval/rewards/accuracies')}, margin {final.get('eval/rewards/margins'):.3f}, "
      f"tokens/s {sum(r['tokens_per_s'] for r in rows if 'tokens_per_s' in r) / sum(1 for r in rows if 'tokens_per_s' in r):.0f}",
      end="")
EOF
), task accuracy $(heldout runs/exp/$loss/final)"
  done
  $PT kto --model $SFT --data task:arithmetic --output-dir runs/exp/kto "${COMMON[@]}" train.max_steps=32 \
    train.batch_size=8 train.lr=2e-5 data.num_examples=128 > runs/exp.kto.log 2>&1
  echo "kto: $(python3 -c 'import json,sys; r=[json.loads(l) for l in open("runs/exp/kto/metrics.jsonl")]; f=[x for x in r if x.get("final")][-1]; print("held-out acc(desirable>undesirable)", f.get("eval/rewards/accuracies"), end="")'), task accuracy $(heldout runs/exp/kto/final)"
}

grpo() {
  echo "start (SFT) held-out accuracy: $(heldout $SFT)"
  $PT grpo --model $SFT --data task:arithmetic --output-dir runs/exp/grpo "${COMMON[@]}" train.max_steps=1000 \
    train.max_minutes=${GRPO_MINUTES:-26} train.schedule=constant train.lr=1e-5 train.batch_size=64 train.eval_every=10 \
    algo.reward.functions=[numeric] algo.sampling.prompts_per_step=8 algo.sampling.num_generations=8 algo.sampling.max_new_tokens=24 \
    algo.sampling.eval_max_new_tokens=24 algo.kl.beta=0.0 data.num_examples=2000 "$@" > runs/exp.grpo.log 2>&1
  echo "grpo: $(grep -c '"loss"' runs/exp/grpo/metrics.jsonl) steps; task accuracy $(heldout runs/exp/grpo/final)"
}

ppo() {  # comparisons of the SFT model's own samples labelled by the verifier, reward models on them, then PPO
  local HELDOUT_LIMIT=256
  echo "start (SFT) held-out accuracy: $(heldout $SFT)"
  local D=runs/exp/onpolicy
  mkdir -p $D
  # 8 samples at T 1 for train prompts 0-799 (training pairs) and 800-927 (held-out pairs on other prompts)
  $PT pairs --model $SFT --data task:arithmetic --output-dir $D --prompts 800 --eval-prompts 128 --samples 8 \
    --temperature 1.0 --max-new-tokens 24 --per-prompt 4 --seed 1
  local PAIRS=(--data $D/pairs.jsonl "${COMMON[@]}" data.num_eval_examples=1000 data.eval_path=$D/eval_pairs.jsonl
               train.batch_size=8 train.eval_every=45)
  # 1. a scalar (Bradley–Terry head) reward model: reported for comparison, ~64 % on these pairs
  $PT rm --model $SFT --output-dir runs/exp/rm_onpolicy "${PAIRS[@]}" train.max_steps=${RM_STEPS:-180} \
    train.lr=${RM_LR:-1e-4} train.warmup_steps=8 > runs/exp.rm_onpolicy.log 2>&1
  echo "scalar rm: held-out pairwise accuracy $(python3 -c 'import json; r=[json.loads(l) for l in open("runs/exp/rm_onpolicy/metrics.jsonl")]; print([x for x in r if x.get("final")][-1]["eval/accuracy"])')"
  # 2. DPO's implicit reward model on the same pairs: β log πθ/π_ref, ~93 % on these pairs
  $PT dpo --model $SFT --output-dir runs/exp/dpo_rm "${PAIRS[@]}" train.max_steps=180 train.lr=1e-5 \
    train.warmup_steps=10 algo.beta=0.1 > runs/exp.dpo_rm.log 2>&1
  echo "implicit rm: held-out pairwise accuracy $(python3 -c 'import json; r=[json.loads(l) for l in open("runs/exp/dpo_rm/metrics.jsonl")]; print([x for x in r if x.get("final")][-1]["eval/rewards/accuracies"])'), its own task accuracy $(heldout runs/exp/dpo_rm/final)"
  # 3. PPO against the implicit reward model (β and reference read from runs/exp/dpo_rm/config.yaml; the
  #    reference is PPO's own, no extra copy); its in-run evaluations use test prompts 0-255
  echo "SFT on test prompts 256-511 (not evaluated during PPO): $(HELDOUT_LIMIT=512 second_half $SFT)"
  $PT ppo --model $SFT --data task:arithmetic --output-dir runs/exp/ppo "${COMMON[@]}" data.num_eval_examples=256 \
    train.max_steps=${PPO_STEPS:-30} train.schedule=constant train.lr=${PPO_LR:-1e-5} train.batch_size=16 \
    train.eval_every=5 algo.reward.model=runs/exp/dpo_rm/final algo.reward.model_kind=implicit \
    algo.reward.functions=[] algo.reward.eval_functions=[numeric] algo.sampling.prompts_per_step=64 \
    algo.minibatch_rows=32 algo.sampling.max_new_tokens=24 algo.sampling.eval_max_new_tokens=24 algo.kl.beta=0.05 \
    data.num_examples=2000 "$@" > runs/exp.ppo.log 2>&1
  echo "ppo: $(grep -c '"loss"' runs/exp/ppo/metrics.jsonl) steps; task accuracy $(heldout runs/exp/ppo/final), on test prompts 256-511 $(HELDOUT_LIMIT=512 second_half runs/exp/ppo/final)"
}

second_half() {  # model -> accuracy on the second half of $HELDOUT_LIMIT held-out prompts
  heldout "$1" > /dev/null
  python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; h=[x["numeric"] for x in r if x["index"] >= len(r) // 2]; print(sum(h) / len(h))' "$1/../heldout.jsonl"
}

overopt() { $PT demo --overopt; }

sft_model() {  # the demo's SFT stage, when no demo has run yet
  [ -d $SFT ] && return
  $PT sft --model smollm2 --data task:arithmetic --output-dir runs/demo/sft "${COMMON[@]}" train.max_steps=24 \
    train.batch_size=8 train.lr=1.5e-4 train.warmup_steps=2 data.num_examples=192 > runs/exp.sft.log 2>&1
}

rl2025() {  # policy losses at equal wall time (RL_MINUTES each), then distillation of the clip model into SFT
  local HELDOUT_LIMIT=256 MIN=${RL_MINUTES:-8}
  sft_model
  echo "start (SFT) held-out accuracy: $(heldout $SFT)"
  # 64 rows per step in 2 minibatches: the second update is off-policy, where the losses differ (at ratio 1 they
  # all give the plain policy gradient); each loss with the clip range its paper uses
  for loss in clip gspo cispo; do
    extra=()
    [ "$loss" = gspo ] && extra=(algo.clip_low=3e-4 algo.clip_high=4e-4)
    [ "$loss" = cispo ] && extra=(algo.clip_high=4.0)
    $PT grpo --model $SFT --data task:arithmetic --output-dir runs/exp/rl_$loss "${COMMON[@]}" train.max_steps=1000 \
      train.max_minutes=$MIN train.schedule=constant train.lr=1e-5 train.batch_size=32 train.eval_every=10 \
      algo.policy_loss=$loss algo.minibatch_rows=32 algo.reward.functions=[numeric] algo.sampling.prompts_per_step=8 \
      algo.sampling.num_generations=8 algo.sampling.max_new_tokens=24 algo.sampling.eval_max_new_tokens=24 \
      algo.kl.beta=0.0 data.num_examples=2000 "${extra[@]}" "$@" > runs/exp.rl_$loss.log 2>&1
    echo "grpo $loss: $(grep -c '"loss"' runs/exp/rl_$loss/metrics.jsonl) steps in $MIN min; task accuracy $(heldout runs/exp/rl_$loss/final)"
  done
  $PT distill --model $SFT --data task:arithmetic --output-dir runs/exp/distill "${COMMON[@]}" train.max_steps=1000 \
    train.max_minutes=$MIN train.schedule=constant train.lr=1e-5 train.batch_size=32 train.eval_every=10 \
    algo.teacher=runs/exp/rl_clip/final algo.reward.functions=[numeric] algo.sampling.prompts_per_step=16 \
    algo.sampling.num_generations=4 algo.sampling.max_new_tokens=24 algo.sampling.eval_max_new_tokens=24 \
    data.num_examples=2000 "$@" > runs/exp.distill.log 2>&1
  echo "distill (teacher rl_clip): $(grep -c '"loss"' runs/exp/distill/metrics.jsonl) steps in $MIN min; task accuracy $(heldout runs/exp/distill/final)"
}

tools() {  # SFT on calculator demonstrations (task:arithmetic_tools), then GRPO through the calculator environment;
  # held-out accuracy on 256 test prompts with the tool (the `tools` environment) and without it, before and after
  local MIN=${RL_MINUTES:-10} T=task:arithmetic_tools TOOL=(--env tools --env-max-turns 3 --env-max-tokens 160)
  acc() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["numeric/accuracy"], 3), "tool calls/traj", round(d.get("env/tool_calls_mean", 0), 2))'; }
  both() {  # model -> accuracy with and without the tool
    echo "with tool: $($PT eval --model "$1" --data $T --reward numeric --limit 256 --max-new-tokens 48 "${TOOL[@]}" \
      --output "$1/../heldout_tool.jsonl" | acc); without: $($PT eval --model "$1" --data $T --reward numeric \
      --limit 256 --max-new-tokens 24 --output "$1/../heldout_notool.jsonl" | acc)"
  }
  local start=$SECONDS
  $PT sft --model smollm2 --data $T --output-dir runs/exp/tools_sft "${COMMON[@]}" data.max_length=320 \
    train.max_steps=${SFT_STEPS:-12} train.batch_size=8 train.lr=${SFT_LR:-1e-4} train.warmup_steps=2 data.num_examples=192 \
    > runs/exp.tools_sft.log 2>&1
  echo "sft ($(( (SECONDS - start) / 60 )) min): $(both runs/exp/tools_sft/final)"
  start=$SECONDS
  $PT grpo --model runs/exp/tools_sft/final --data $T --output-dir runs/exp/tools_grpo "${COMMON[@]}" \
    train.max_steps=1000 train.max_minutes=$MIN train.schedule=constant train.lr=1e-5 train.batch_size=32 \
    train.eval_every=0 algo.reward.functions=[numeric] algo.sampling.prompts_per_step=8 algo.sampling.num_generations=8 \
    algo.sampling.max_new_tokens=48 algo.sampling.eval_max_new_tokens=48 algo.kl.beta=0.0 data.num_examples=2000 \
    data.max_prompt_length=256 algo.env.name=tools algo.env.max_turns=3 algo.env.max_total_tokens=160 "$@" \
    > runs/exp.tools_grpo.log 2>&1
  echo "grpo ($(( (SECONDS - start) / 60 )) min, $(grep -c '"loss"' runs/exp/tools_grpo/metrics.jsonl) steps): $(both runs/exp/tools_grpo/final)"
}

mkdir -p runs/exp
"$@"
