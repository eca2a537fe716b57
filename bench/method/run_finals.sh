#!/bin/bash
# Final selection v1 (RetFormer cells lr 3e-3 / 1e-2, plain CE), then the last research runs.
cd /work/wt-method/bench/method
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-method
PY=/work/main/.venv/bin/python
$PY final.py digits_lt digits_world '{"lr": [0.003, 0.01]}' '{"epochs": 60}' > /work/wt-method/work/final_digits.log 2>&1
$PY final.py digits_lt fmnist_world '{"lr": [0.003, 0.01]}' '{"epochs": 60}' > /work/wt-method/work/final_digits_irr.log 2>&1
$PY final.py fmnist_lt fmnist_world '{"lr": [0.003, 0.01]}' '{"epochs": 30}' > /work/wt-method/work/final_fmnist.log 2>&1
$PY experiments.py fmnist_lt fmnist_world paper_small_20 >> /work/wt-method/work/exp_fmnist.log 2>&1
echo FINALSDONE >> /work/wt-method/work/final_fmnist.log
$PY experiments.py digits_lt digits_world indep_la_small_60 >> /work/wt-method/work/exp_digits.log 2>&1
$PY experiments.py fmnist_lt fmnist_world indep_la_small_60@30 >> /work/wt-method/work/exp_fmnist.log 2>&1
echo LADONE >> /work/wt-method/work/final_fmnist.log
