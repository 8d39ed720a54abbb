#!/bin/bash
# Runs the remaining baselines one after another (each in its own process).
cd /work/peer
for n in llmc-gptq-w2g64 llmc-sparsegpt-2of4 llmc-sparsegpt-s50 llmc-wanda-s50 llmc-wanda-2of4 llmc-gptq-w4g64-actstatic; do
  ( time .venv/bin/python scripts/run_llmc.py $n ) > logs/$n.log 2>&1
  echo "$n done rc=$?" >> logs/run_all.progress
done
