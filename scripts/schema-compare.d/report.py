# Runs compare for every extracted case and writes report.md (table + differences).
import json, subprocess, sys, os
out, ours_bin, cmp = sys.argv[1:4]
cases = json.load(open(os.path.join(out, "cases.json")))
rows, diffs = [], []
for i, c in enumerate(cases):
    sp = os.path.join(out, "cases", f"{i:02}.schema.json")
    gp = os.path.join(out, "cases", f"{i:02}.ours.gbnf")
    open(sp, "w").write(c["schema_text"])
    r = subprocess.run([ours_bin, sp], capture_output=True, text=True)
    note = ""
    if r.returncode == 0:
        open(gp, "w").write(r.stdout)
    else:
        gp = "-"
        note = r.stderr.strip().removeprefix("schema-to-gbnf: ")
    res = subprocess.run([cmp, sp, gp, str(1000 + i)], capture_output=True, text=True)
    lines = res.stdout.strip().split("\n")
    t_ok, o_ok, n, agree = lines[0].split("\t")
    case_diffs = [l.split("\t", 3)[1:] for l in lines[1:] if l.startswith("DIFF")]
    yes = lambda b: "yes" if b == "1" else "no"
    rows.append(f"| {c['name']} | {yes(t_ok)} | {yes(o_ok)} | {n} | {agree} | {note} |")
    for t, o, doc in case_diffs:
        diffs.append(f"- **{c['name']}**: theirs {'accepts' if t == '1' else 'rejects'}, ours {'accepts' if o == '1' else 'rejects'}: `{json.loads(doc)!r}`")
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("| schema | theirs converts | ours converts | samples | agree | note |\n|---|---|---|---|---|---|\n")
    f.write("\n".join(rows) + "\n\n## Differences\n\n" + ("\n".join(diffs) or "none") + "\n")
