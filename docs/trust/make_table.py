"""The tables of docs/trust/README.md from its runs: final cloud test accuracy, mean +- sample std over seeds.
    python docs/trust/make_table.py docs/trust/runs
"""
import collections, glob, json, os, statistics as st, sys

import yaml
rows = collections.defaultdict(list)
for d in sorted(glob.glob(os.path.join(sys.argv[1] if len(sys.argv) > 1 else 'docs/trust/runs', '*', '[0-9]*'))):
    s = f'{d}/summary.json'
    if not os.path.exists(s): print('missing', d); continue
    S = json.load(open(s)); ov = yaml.safe_load(open(f'{d}/overrides.yaml'))
    o = dict(x.split('=', 1) for x in ov if '=' in x and not x.startswith('+experiment') and not x.startswith('hydra'))
    o.pop('seed', None)
    key = (os.path.basename(os.path.dirname(d)), tuple(sorted(o.items())))
    rows[key].append((S.get('final_test_acc'), S.get('epsilon')))
for (exp, k), v in sorted(rows.items()):
    accs = [a for a, _ in v if a is not None]
    m = st.mean(accs) * 100 if accs else float('nan'); sd = st.stdev(accs) * 100 if len(accs) > 1 else 0
    eps = v[0][1]
    print(f"{exp}\t{dict(k)}\tn={len(v)}\tacc={m:.2f}±{sd:.2f}\teps={eps}")
