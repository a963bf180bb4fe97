#!/bin/bash
# run.sh NAME ARGS... : patch on fashion-mnist:train subset, then white-box eval on 500 test images
name=$1; shift
export OMP_NUM_THREADS=1
H=/work/main/.venv/bin/harden; E=/work/main/examples
/usr/bin/time -f "%e s wall" $H patch $E/fmnist_base.safetensors --data fashion-mnist:train --preset robust "$@" \
  --eval-data fashion-mnist:test --eval-samples 200 --eval-steps 10 --out /tmp/exp/$name.safetensors --force --quiet \
  --report /tmp/exp/$name.patch.json > /tmp/exp/$name.log 2>&1
/usr/bin/time -f "%e s wall" $H eval /tmp/exp/$name.safetensors --data fashion-mnist:test --max-samples 500 --attack apgd-ce,apgd-dlr \
  --threat whitebox --no-checks --quiet --json > /tmp/exp/$name.eval.json 2>> /tmp/exp/$name.log
python3 -c "
import json;r=json.load(open('/tmp/exp/$name.eval.json'));print(json.dumps(r.get('summary', list(r.keys()))))" >> /tmp/exp/$name.log 2>&1
