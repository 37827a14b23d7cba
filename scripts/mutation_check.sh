#!/usr/bin/env bash
# Mutation check: break a library function on purpose (an off-by-one shift, a dropped mask, a
# wrong sign), run the tests that should catch it, restore it with git checkout. Each line
# should print failures, then "restored: ... passed". Run from the repository root with a clean
# working tree (it restores files with git checkout).
run() {
  local file="$1" old="$2" new="$3" tests="$4" name="$5"
  python - "$file" "$old" "$new" <<'PY'
import sys, pathlib
p = pathlib.Path(sys.argv[1]); s = p.read_text()
assert sys.argv[2] in s, "mutation site not found"
p.write_text(s.replace(sys.argv[2], sys.argv[3], 1))
PY
  out=$(OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 timeout 600 python -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -1)
  git checkout -q -- "$file"
  echo "$name :: $out"
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -1 | sed 's/^/   restored: /'
}
run irm_lens/losses.py 'target = F.pad(input_ids[:, 1:], (0, 1))' 'target = input_ids' tests/unit/test_dataset.py "off-by-one: no shift in token_nll"
run irm_lens/data/dataset.py 'loss_mask[i, scored_from[i] if scored_from is not None else 0 : len(row)] = 1' 'loss_mask[i, 0 : len(row)] = 1' "tests/unit/test_dataset.py tests/unit/test_objectives.py" "dropped mask: right_pad scores the prompt"
run irm_lens/evaluate.py 'diff = (per_prompt[(alignment, "on")] - per_prompt[(alignment, "off")]).to_numpy()' 'diff = (per_prompt[(alignment, "off")] - per_prompt[(alignment, "on")]).to_numpy()' tests/unit/test_evaluate.py "wrong sign: lift = off - on"
run irm_lens/hooks.py 'resid[..., index] = new.to(resid.dtype) if isinstance(new, Tensor) else new' 'resid[..., index + 1] = new.to(resid.dtype) if isinstance(new, Tensor) else new' tests/unit/test_analysis_model.py "off-by-one: overwrite_index writes the next index"
run irm_lens/objectives.py 'return masked_lm_loss(logits, batch.ids, batch.scored)' 'return masked_lm_loss(logits, batch.ids, batch.mask)' "tests/unit/test_train.py tests/unit/test_objectives.py" "dropped mask: LM objective scores chat prompts too"
