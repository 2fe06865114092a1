#!/usr/bin/env bash
# The C# bindings and the Unity package, on a fresh Debian 12 machine (installs what it needs):
#   1. builds the library (release) if needed;
#   2. compiles bindings/unity/Runtime (the one copy of the C# sources) with mcs -warnaserror,
#      lays it out as an app would ship it (runtimes/linux-x64/native/ + a Mono dllmap) and runs
#      bindings/csharp/tests against the .so, checking tokens against the Rust CLI's;
#   3. compiles the same sources as Unity would (UNITY_5_3_OR_NEWER, test-only UnityEngine stubs)
#      with the package's sample, and drives the sample's Start/Update loop;
#   4. checks the package's files (package.json, asmdef, .meta GUIDs and plugin import settings).
# Non-zero exit on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)

if ! command -v mcs >/dev/null || ! command -v mono >/dev/null; then
  echo "== installing mono-devel (mcs, mono)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mono-devel >/dev/null
fi
if ! command -v python3 >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi

echo "== library (release)"
cargo build --release --quiet
lib=target/release/libgpt2rt.so
cli=target/release/gpt2rt

out=target/csharp
rm -rf "$out"
mkdir -p "$out/app/runtimes/linux-x64/native" "$out/unity"
runtime=(bindings/unity/Runtime/*.cs)
mcs_flags=(-warnaserror -warn:4 -langversion:7.2 -nologo -debug)

echo "== compile the bindings (plain C#: Mono / .NET)"
mcs "${mcs_flags[@]}" -target:library -out:"$out/app/Gpt2Rt.dll" "${runtime[@]}"
cp bindings/csharp/Gpt2Rt.dll.config "$out/app/"
cp "$lib" "$out/app/runtimes/linux-x64/native/"
mcs "${mcs_flags[@]}" -target:exe -out:"$out/app/Gpt2Rt.Tests.exe" -r:"$out/app/Gpt2Rt.dll" -r:System.Core.dll \
  bindings/csharp/tests/Tests.cs

echo "== expected tokens from the Rust CLI"
n=16
expected="$out/expected.tsv"
printf 'max_new_tokens\t%s\n' "$n" >"$expected"
gen() { "$cli" generate --backend cpu --builtin tiny --print-tokens --max-new-tokens "$n" "$@" 2>/dev/null; }
for prompt in "Hello, my name is" "Grüße, 世界 🌍" "x"; do
  printf 'greedy\t%s\t%s\n' "$prompt" "$(gen "$prompt")" >>"$expected"
done
printf 'sampled\t%s\t%s\n' "Hello, my name is" \
  "$(gen --temperature 0.8 --top-k 40 --top-p 0.95 --seed 7 "Hello, my name is")" >>"$expected"
batch=("Hello, my name is" "Once upon a time, in a land far away" "A")
mapfile -t lines < <(gen "${batch[@]}")
for i in "${!batch[@]}"; do
  printf 'batch\t%s\t%s\n' "${batch[$i]}" "${lines[$i]}" >>"$expected"
done
cat "$expected"

echo "== Unity package: the Runtime compiled as Unity would, the sample built and driven"
# UnityStubs.cs is test-only (not in the package): MonoBehaviour, Debug.Log, Time and Unity's
# AOT.MonoPInvokeCallbackAttribute, which the Runtime then takes from "UnityEngine".
mcs "${mcs_flags[@]}" -target:library -out:"$out/unity/UnityEngine.dll" bindings/csharp/tests/UnityStubs.cs
mcs "${mcs_flags[@]}" -target:library -define:UNITY_5_3_OR_NEWER -r:"$out/unity/UnityEngine.dll" \
  -out:"$out/unity/Gpt2Rt.dll" "${runtime[@]}"
mcs "${mcs_flags[@]}" -target:library -r:"$out/unity/UnityEngine.dll" -r:"$out/unity/Gpt2Rt.dll" \
  -out:"$out/unity/Gpt2Rt.Samples.dll" bindings/unity/Samples~/StepPerFrame/*.cs
mcs "${mcs_flags[@]}" -target:exe -r:"$out/unity/UnityEngine.dll" -r:"$out/unity/Gpt2Rt.dll" \
  -r:"$out/unity/Gpt2Rt.Samples.dll" -r:System.Core.dll -out:"$out/unity/Gpt2Rt.SampleRunner.exe" \
  bindings/csharp/tests/SampleRunner.cs
# No dllmap here: the library is found through LD_LIBRARY_PATH, the other Mono way.
(cd "$out/unity" && LD_LIBRARY_PATH="$root/target/release" mono --debug Gpt2Rt.SampleRunner.exe "$root/$expected")

echo "== Unity package: files, GUIDs, plugin import settings"
python3 - bindings/unity <<'PY'
import json, os, re, sys
pkg = sys.argv[1]
errors = []
manifest = json.load(open(os.path.join(pkg, "package.json")))
for key in ("name", "version", "displayName", "unity"):
    if key not in manifest:
        errors.append(f"package.json lacks {key}")
if not re.fullmatch(r"com(\.[a-z0-9-]+)+", manifest.get("name", "")):
    errors.append("package.json name is not reverse-DNS lower case")
for sample in manifest.get("samples", []):
    if not os.path.isdir(os.path.join(pkg, sample["path"])):
        errors.append(f"sample path {sample['path']} missing")
asmdef = json.load(open(os.path.join(pkg, "Runtime", "Gpt2Rt.asmdef")))
if asmdef.get("name") != "Gpt2Rt":
    errors.append("asmdef name is not Gpt2Rt")
guids = {}
# Unity imports package.json, README.md and everything under Runtime/: each needs its .meta
# (an immutable package cannot get one generated). Samples~ is not imported.
imported = [os.path.join(pkg, "package.json"), os.path.join(pkg, "README.md"), os.path.join(pkg, "Runtime")]
for d, dirs, files in os.walk(os.path.join(pkg, "Runtime")):
    imported += [os.path.join(d, x) for x in dirs + files if not x.endswith(".meta") and not x.startswith(".")]
for path in imported:
    if not os.path.exists(path):
        errors.append(f"{path} missing")
    elif not os.path.exists(path + ".meta"):
        errors.append(f"{path} has no .meta")
for d, _, files in os.walk(pkg):
    for f in files:
        if f.endswith(".meta"):
            text = open(os.path.join(d, f)).read()
            m = re.search(r"^guid: ([0-9a-f]{32})$", text, re.M)
            if not m:
                errors.append(f"{f}: no guid")
            elif m.group(1) in guids:
                errors.append(f"{f}: guid shared with {guids[m.group(1)]}")
            else:
                guids[m.group(1)] = f
def section(text, platform):
    m = re.search(r"- first:\n      " + re.escape(platform) + r"\n    second:\n      enabled: (\d)\n      settings:\n((?:        .*\n)*)", text)
    return (m.group(1), m.group(2)) if m else (None, "")
plugins = os.path.join(pkg, "Runtime", "Plugins", "x86_64")
for lib, editor_os, on, off in (("libgpt2rt.so", "Linux", "Standalone: Linux64", "Standalone: Win64"),
                                ("gpt2rt.dll", "Windows", "Standalone: Win64", "Standalone: Linux64")):
    text = open(os.path.join(plugins, lib + ".meta")).read()
    enabled, settings = section(text, on)
    if enabled != "1" or "CPU: x86_64" not in settings:
        errors.append(f"{lib}: {on} not enabled for x86_64")
    if section(text, off)[0] != "0":
        errors.append(f"{lib}: {off} should be disabled")
    enabled, settings = section(text, "Editor: Editor")
    if enabled != "1" or f"OS: {editor_os}" not in settings or "CPU: x86_64" not in settings:
        errors.append(f"{lib}: editor import should be {editor_os} x86_64")
stubs = [f for f in os.listdir(os.path.join(pkg, "Runtime")) if "Stub" in f]
if stubs:
    errors.append(f"test stubs inside the package: {stubs}")
for e in errors:
    print("FAIL -", e)
print(f"package checks: {len(guids)} GUIDs unique, {len(errors)} problem(s)")
sys.exit(1 if errors else 0)
PY

echo "== run the tests with mono (library found through the dllmap in runtimes/linux-x64/native/)"
(cd "$out/app" && env -u LD_LIBRARY_PATH mono --debug Gpt2Rt.Tests.exe "$root/$expected")

echo "== done in $(($(date +%s) - start)) s"
