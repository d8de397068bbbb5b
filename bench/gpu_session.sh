#!/usr/bin/env bash
# One device call: stage "final-train" (the NF4 dequantization kernel checked against bitsandbytes, then HF
# Trainer vs our loop: compiled layers recomputed inside their graphs, expanded double quant, 4-bit weights
# dequantized in the graph; beyond 4 x 512 the first layers keeping their 4-bit matmul outputs and LoRA dropout
# in its kernel; at 8 x 2048 a variant within 22 GiB too), "final-eval" (in-loop eval and infer.py beside HF
# generate), "cli" (train.py recipes/baseline.yaml as users run it, cold and warm compile cache, beside HF
# Trainer on the same CSV: bench/bench_cli.py), "cli-all" (the same with Unsloth beside them, 20 steps), "profile-cli"
# (the default plan's step under torch.profiler, through engine.loop's setup and train_step), "diagnose" (that
# profile, an older commit's train.py from .carry/old6b, Unsloth), "graphs" (train.cuda_graphs against the same
# levers without it on a 4-layer model, then train.py baseline as users run it), "debug-capture"
# (bench/debug_capture.py: each capture's first error), "loop" (train.py baseline 30 steps), ...
# Needs .whl (../shared/tools/gpu-carry.sh; its kiwipiepy wheels may be left out: 35 MiB the bench never imports)
# and .carry (A.X tokenizer files + FSKU dev CSV) carried along; "cli-all" and "diagnose" also .unsloth
# (../shared/tools/unsloth-carry.sh). Results land in $OUT.
set -uo pipefail
stage=${1:-loop}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=.cache/ax-random D=.cache/bench-data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu_$stage.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__)" >> "$OUT/gpu_$stage.txt"
t=$(date +%s)
python3 -c "from pathlib import Path; from bench.common import make_random_model as m; m(Path('.carry/ax4-light-tokenizer'), Path('$M'))" || exit 1
echo "model ready after $(( $(date +%s) - t )) s" >> "$OUT/gpu_$stage.txt"
python3 -m bench.make_data .carry/fsku_dev.csv .carry/ax4-light-tokenizer $D || exit 1
if [ "$stage" = graphs ]; then
  # CUDA graphs against the same levers without them (dropout 0: the same step bit for bit is the claim) on a
  # 4-layer A.X-width model, then train.py recipes/baseline.yaml as users run it (cold cache, no HF)
  python3 -c "from pathlib import Path; from bench.common import make_random_model as m; m(Path('.carry/ax4-light-tokenizer'), Path('.cache/ax-4l'), layers=4)" || exit 1
  export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
  levers="train.speed=off train.compile=true train.expand_double_quant=true train.dequant_in_graph=true train.save_matmuls=4"
  common="recipes/baseline.yaml model.path=.cache/ax-4l data.train=$D/eval2000.csv data.eval_size=64 train.max_steps=12
    lora.dropout=0 eval.generate=false eval.every_steps=0 checkpoint.at_steps=[] checkpoint.every_epoch=false $levers"
  for g in false true; do
    timeout 150 python3 train.py $common train.cuda_graphs=$g output_dir=.cache/graphs-$g > "$OUT/graphs_$g.log" 2>&1
    cp .cache/graphs-$g/metrics.jsonl "$OUT/graphs_${g}_metrics.jsonl"
  done
  python3 -m bench.compare_losses "$OUT/graphs_false_metrics.jsonl" "$OUT/graphs_true_metrics.jsonl" \
    > "$OUT/graphs_compare.txt" 2>&1
  timeout 280 python3 -m bench.bench_cli $M $D/eval2000.csv "$OUT/cli.json" --steps 30 --ours-only \
    --override eval.generate=false > "$OUT/cli.log" 2>&1
  cp .cache/bench-cli/cold/metrics.jsonl "$OUT/cli_cold_metrics.jsonl" 2>/dev/null
elif [ "$stage" = debug-capture ]; then
  python3 -c "from pathlib import Path; from bench.common import make_random_model as m; m(Path('.carry/ax4-light-tokenizer'), Path('.cache/ax-4l'), layers=4)" || exit 1
  common="recipes/baseline.yaml model.path=.cache/ax-4l data.train=$D/eval2000.csv data.eval_size=64 lora.dropout=0
    eval.generate=false train.cuda_graphs=true train.resume=false"
  timeout 60 python3 -m bench.debug_capture $common train.speed=off output_dir=.cache/debug-eager \
    > "$OUT/debug_eager.log" 2>&1
  TORCH_LOGS="+torch._inductor.codecache,+torch._functorch._aot_autograd.autograd_cache" timeout 200 \
    python3 -m bench.debug_capture $common output_dir=.cache/debug-compiled > "$OUT/debug_compiled.log" 2>&1
elif [ "$stage" = cli-all ]; then
  # ours (cold, then warm compile cache), HF Trainer and Unsloth on one CSV, one card, one call (needs .unsloth
  # carried too: ../shared/tools/unsloth-carry.sh); 20 steps each to fit the device's 10 minutes a call
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/usite \
    .unsloth/whl/*.whl || exit 1
  export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
  timeout 540 python3 -m bench.bench_cli $M $D/eval2000.csv "$OUT/cli.json" --steps 20 \
    --override eval.generate=false --unsloth-site /tmp/usite > "$OUT/cli.log" 2>&1
  for r in cold warm; do cp .cache/bench-cli/$r/metrics.jsonl "$OUT/cli_${r}_metrics.jsonl" 2>/dev/null; done
elif [ "$stage" = profile-cli ]; then
  # the default plan's packed step, profiled through the loop's own setup / train_step (bench/profile_cli.py)
  export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
  timeout 400 python3 -m bench.profile_cli $M $D/eval2000.csv "$OUT" > "$OUT/profile_cli.log" 2>&1
elif [ "$stage" = diagnose ]; then
  # the profile, then the commit that measured 0.27 s a step (.carry/old6b: git archive 6b59b1e), then Unsloth
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/usite \
    .unsloth/whl/*.whl || exit 1
  export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
  timeout 190 python3 -m bench.profile_cli $M $D/eval2000.csv "$OUT" > "$OUT/profile_cli.log" 2>&1
  (cd .carry/old6b && PYTHONPATH=/tmp/site:$PWD timeout 180 python3 -m bench.bench_cli ../../$M ../../$D/eval2000.csv \
    "$OUT/old6b.json" --steps 16 --ours-only --key old6b --override eval.generate=false > "$OUT/old6b.log" 2>&1)
  cp .carry/old6b/.cache/bench-cli/cold/metrics.jsonl "$OUT/old6b_metrics.jsonl"
  PYTHONPATH=/tmp/usite:$PWD timeout 170 python3 -m bench.unsloth_cli recipes/baseline.yaml $M $D/eval2000.csv 16 \
    "$OUT/cli_unsloth.json" > "$OUT/cli_unsloth.log" 2>&1
elif [ "$stage" = cli ]; then
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
  timeout 430 python3 -m bench.bench_cli $M $D/eval2000.csv "$OUT/cli.json" --steps 24 \
    --override eval.generate=false > "$OUT/cli.log" 2>&1
  timeout 90 python3 -m bench.bench_cli $M $D/eval2000.csv "$OUT/cli_off.json" --steps 20 \
    --override eval.generate=false --override train.speed=off --override train.packing=false --ours-only --key old_default \
    > "$OUT/cli_off.log" 2>&1
  for r in cold warm; do cp .cache/bench-cli/$r/metrics.jsonl "$OUT/cli_${r}_metrics.jsonl" 2>/dev/null; done
elif [ "$stage" = cli-budget ]; then
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
  for gib in 22 12; do
    timeout 200 python3 -m bench.bench_cli $M $D/eval2000.csv "$OUT/cli_budget.json" --steps 24 --ours-only \
      --key "memory_gib_$gib" --override eval.generate=false --override train.memory_gib=$gib > "$OUT/cli_$gib.log" 2>&1
    cp .cache/bench-cli/cold/metrics.jsonl "$OUT/cli_${gib}_metrics.jsonl"
  done
elif [ "$stage" = loop ]; then
  rm -rf .cache/run-baseline
  python3 train.py recipes/baseline.yaml model.path=$M data.train=$D/long512.csv train.max_steps=30 \
    train.micro_batch=4 train.grad_accum=1 eval.generate=false eval.every_steps=0 data.eval_size=16 \
    output_dir=.cache/run-baseline > "$OUT/baseline.log" 2>&1
  cp .cache/run-baseline/metrics.jsonl "$OUT/baseline_metrics.jsonl"
  python3 infer.py --test $D/contest.csv --out .cache/submission.csv --model $M --batch-size 64 \
    > "$OUT/infer.json" 2> "$OUT/infer.log"
  python3 -m bench.bench_eval $M $D/eval2000.csv "$OUT/eval.json" > "$OUT/eval.log" 2>&1
elif [ "$stage" = ddp ]; then
  common="recipes/baseline.yaml model.path=$M data.train=$D/long512.csv train.max_steps=13 train.micro_batch=4
    train.grad_accum=2 lora.dropout=0 eval.generate=false eval.every_steps=0 data.eval_size=16 checkpoint.at_steps=[]
    checkpoint.every_epoch=false"
  rm -rf .cache/ddp1 .cache/ddp2
  python3 train.py $common output_dir=.cache/ddp1 > "$OUT/ddp1.log" 2>&1
  python3 -m torch.distributed.run --standalone --nproc_per_node=2 train.py $common output_dir=.cache/ddp2 \
    > "$OUT/ddp2.log" 2>&1
  cp .cache/ddp1/metrics.jsonl "$OUT/ddp1_metrics.jsonl"; cp .cache/ddp2/metrics.jsonl "$OUT/ddp2_metrics.jsonl"
  nvidia-smi --query-gpu=index,name --format=csv,noheader >> "$OUT/gpu_$stage.txt"
elif [ "$stage" = explore-levers ]; then
  timeout 150 python3 -m bench.bench_eval $M $D/eval2000.csv "$OUT/eval.json" --skip-hf --variants lora,merged \
    > "$OUT/eval.log" 2>&1
  timeout 420 python3 -m bench.bench_train $M "$OUT/train.json" --skip-hf --shapes 8x1024 --ours compile+keep4 \
    --ours compile+absmax+keep4 > "$OUT/train.log" 2>&1
elif [ "$stage" = explore-ingraph ]; then
  timeout 560 python3 -m bench.bench_train $M "$OUT/train.json" --skip-hf --ours compile+absmax+keep4+outside:8x1024 \
    --ours compile+absmax+keep4:4x512,8x1024 --ours compile+absmax+keep2:8x2048 --ours compile+absmax+keep6:8x1024 \
    > "$OUT/train.log" 2>&1
elif [ "$stage" = explore-dropk ]; then
  timeout 120 python3 -m bench.check_dropout_kernel "$OUT/dropout_kernel.json" > "$OUT/dropout_kernel.log" 2>&1
  timeout 450 python3 -m bench.bench_train $M "$OUT/train.json" --skip-hf --ours compile+absmax+dropk+keep4:8x1024 \
    --ours compile+absmax+dropk+keep2:8x2048 --ours compile+absmax+dropk+savemm10+keep2:8x1024 \
    --ours compile+absmax+dropk+savemm6+keep1:8x2048 --ours compile+absmax+dropk+savemm20:8x2048 \
    --ours compile+absmax+dropk+savemm14:8x1024,8x2048 --profile 8x2048 > "$OUT/train.log" 2>&1
elif [ "$stage" = profile-512 ]; then
  timeout 400 python3 -m bench.bench_train $M "$OUT/train.json" --skip-hf --ours compile+absmax+savemm2+keep4:4x512 \
    --profile 4x512 > "$OUT/train.log" 2>&1
elif [ "$stage" = explore-512 ]; then
  timeout 540 python3 -m bench.bench_train $M "$OUT/train.json" --hf-shapes 4x512 --ours compile+absmax+keep4:4x512 \
    --ours compile+absmax+keep5:4x512 --ours compile+absmax+savemm2+keep4:4x512 \
    --ours compile+absmax+fused_lora+keep4:4x512 --ours compile+absmax+fused_lora+keep5:4x512 > "$OUT/train.log" 2>&1
elif [ "$stage" = explore-small ]; then
  timeout 500 python3 -m bench.bench_train $M "$OUT/train.json" --skip-hf --ours compile+absmax+keep4:4x512,mix8,mix16 \
    --ours compile+absmax+dropk+savemm10:8x1024,4x512,mix8,mix16 > "$OUT/train.log" 2>&1
elif [ "$stage" = explore-dequant ]; then
  timeout 100 python3 -m bench.check_nf4 "$OUT/nf4.json" > "$OUT/nf4.log" 2>&1
  timeout 420 python3 -m bench.bench_train $M "$OUT/train.json" --hf-shapes 4x512 \
    --ours compile+absmax+savemm2+keep4:4x512 --ours compile+absmax+dequant+dropk+savemm10:8x1024 \
    --ours compile+absmax+dequant+savemm2+keep4:4x512 --profile 4x512 > "$OUT/train.log" 2>&1
elif [ "$stage" = final-train ]; then
  timeout 60 python3 -m bench.check_nf4 "$OUT/nf4.json" > "$OUT/nf4.log" 2>&1
  timeout 540 python3 -m bench.bench_train $M "$OUT/train.json" --hf-shapes 4x512,8x1024,8x2048,mix8,mix16 \
    --ours compile+absmax+dequant+savemm2+keep4:4x512 --ours compile+absmax+dequant+keep5:4x512 \
    --ours compile+absmax+dequant+dropk+savemm10:8x1024,mix8,mix16,gmix128 \
    --ours compile+absmax+dequant+dropk+savemm5:8x2048 --ours compile+absmax+dequant+dropk+savemm12:8x2048 \
    > "$OUT/train.log" 2>&1
elif [ "$stage" = final-eval ]; then
  python3 -c "from pathlib import Path; from bench.common import make_random_adapter as a; a(Path('$M'), Path('.cache/adapter'))"
  timeout 200 python3 -m bench.bench_eval $M $D/eval2000.csv "$OUT/eval.json" > "$OUT/eval.log" 2>&1
  timeout 100 python3 -m bench.bench_eval $M $D/eval2000.csv "$OUT/eval128.json" --skip-hf --variants merged \
    --batch-size 128 >> "$OUT/eval.log" 2>&1
  for merge in "" --no-merge; do
    timeout 120 python3 infer.py --test $D/contest.csv --out .cache/submission$merge.csv --model $M \
      --adapter .cache/adapter --batch-size 64 $merge > "$OUT/infer$merge.json" 2> "$OUT/infer$merge.log"
  done
elif [ "$stage" = train-compiled ]; then
  python3 -m bench.bench_train $M "$OUT/train_compiled.json" --compile --shapes 4x512,8x1024,8x2048,mix16,gmix64 \
    > "$OUT/train_compiled.log" 2>&1
elif [ "$stage" = compile ]; then
  timeout 420 python3 -m bench.compile_probe $M "$OUT/compile.json" > "$OUT/compile.log" 2>&1
elif [ "$stage" = profile ]; then
  python3 -m bench.profile_step $M "$OUT" > "$OUT/profile.log" 2>&1
  python3 infer.py --test $D/contest.csv --out .cache/submission.csv --model $M --batch-size 64 \
    > "$OUT/infer.json" 2> "$OUT/infer.log"
  python3 -m bench.bench_eval $M $D/eval2000.csv "$OUT/eval.json" > "$OUT/eval.log" 2>&1
  python3 -m bench.bench_train $M "$OUT/train_mix.json" --skip-hf --shapes mix16,mix64,gmix64 \
    > "$OUT/train_mix.log" 2>&1
else
  python3 -m bench.bench_train $M "$OUT/train.json" > "$OUT/train.log" 2>&1
fi
for f in "$OUT"/*.log; do tail -n 3 "$f"; done; cat "$OUT"/*.json | head -80
