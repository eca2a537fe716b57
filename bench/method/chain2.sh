#!/bin/bash
cd /work/wt-method/bench/method
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-method
PY=/work/main/.venv/bin/python
while pgrep -f "experiments.py digits_lt digits_world boost" >/dev/null; do sleep 3; done
$PY experiments.py digits_lt digits_world indep_small_60 indep_shuf_small_60 >> /work/wt-method/work/exp_digits.log 2>&1
$PY experiments.py fmnist_lt fmnist_world baselines indep_shuf_small_60@30 paper_small_20 >> /work/wt-method/work/exp_fmnist.log 2>&1
$PY experiments.py digits_lt fmnist_world baselines indep_shuf_small_60 >> /work/wt-method/work/exp_digits_irr.log 2>&1
echo CHAINDONE >> /work/wt-method/work/exp_fmnist.log
