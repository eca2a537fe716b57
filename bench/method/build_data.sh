#!/bin/bash
# Builds every KB / dataset / neighbour table the method research reads, in the worktree's ./work.
set -e
cd /work/wt-method
export PYTHONPATH=/work/wt-method OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R="/work/main/.venv/bin/retformer"
W="--workdir work"
$R shards --kb fmnist_world $W
$R shards --dataset fmnist_lt $W
$R shards --dataset digits_lt $W
$R shards --kb digits_world $W
$R embed --kb digits_world --dataset digits_lt --workers 1 $W
$R index --kb digits_world $W
$R neighbors --dataset digits_lt --kb digits_world $W
$R embed --kb fmnist_world --dataset fmnist_lt --workers 1 $W
$R index --kb fmnist_world $W
$R neighbors --dataset fmnist_lt --kb fmnist_world $W
$R neighbors --dataset digits_lt --kb fmnist_world $W
echo ALLDONE
