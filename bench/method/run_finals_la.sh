#!/bin/bash
# Final selection v2: the RetFormer grid adds logit adjustment for L_R's loss (la_tau in {0, 1}), lr 3e-3.
cd /work/wt-method/bench/method
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-method FINAL_SUFFIX=_la
PY=/work/main/.venv/bin/python
$PY final.py digits_lt digits_world '{"lr": [0.003], "la_tau": [0.0, 1.0]}' '{"epochs": 60}' > /work/wt-method/work/final_la_digits.log 2>&1
$PY final.py fmnist_lt fmnist_world '{"lr": [0.003], "la_tau": [0.0, 1.0]}' '{"epochs": 30}' > /work/wt-method/work/final_la_fmnist.log 2>&1
$PY final.py digits_lt fmnist_world '{"lr": [0.003], "la_tau": [0.0, 1.0]}' '{"epochs": 60}' > /work/wt-method/work/final_la_digits_irr.log 2>&1
echo DONE >> /work/wt-method/work/final_la_digits_irr.log
