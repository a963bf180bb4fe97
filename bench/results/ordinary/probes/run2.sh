#!/bin/bash
# run2.sh NAME DATA ARGS... : demo-scale patch (default split) then white-box eval on 500 shipped test images
name=$1; data=$2; shift 2
export OMP_NUM_THREADS=${THREADS:-1}
H=/work/main/.venv/bin/harden; E=/work/main/examples
cd /tmp/exp
/usr/bin/time -f "%e s wall patch" $H patch $E/fmnist_base.safetensors --data $data "$@" \
  --out /tmp/exp/$name.safetensors --force --report /tmp/exp/$name.patch.json > /tmp/exp/$name.log 2>&1
/usr/bin/time -f "%e s wall eval" $H eval /tmp/exp/$name.safetensors --data $E/data/fashion-mnist-test-1000.npz --max-samples 500 --attack apgd-ce,apgd-dlr \
  --threat whitebox --no-checks --quiet --json > /tmp/exp/$name.eval.json 2>> /tmp/exp/$name.log
python3 -c "
import json;r=json.load(open('/tmp/exp/$name.eval.json'))
m=r['models']
print('RESULT $name', 'base clean', m['base']['clean']['accuracy'], 'patched clean', m['patched']['clean']['accuracy'], 'wb', m['patched']['threats']['whitebox']['robust']['accuracy'])" >> /tmp/exp/$name.log 2>&1
