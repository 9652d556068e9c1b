# Sourced by gpu-check.sh and gpu-diag.sh on a GPU machine, with $out and $bin
# set: unpacks an .xz-packed binary into $out (then $bin names it), and puts the
# CUDA libraries on LD_LIBRARY_PATH: the system's, else those of torch's nvidia
# wheels (cuBLAS, cuRAND, cuDNN, NVRTC, the runtime).
if [[ "$bin" == *.xz ]]; then
  xz -d -c "$bin" > "$out/reid" && chmod +x "$out/reid" && bin=$out/reid
fi
libs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for pattern in ("nvidia/*/lib", "nvidia/cu*/lib", "torch/lib"):
        dirs.update(d for d in glob.glob(os.path.join(sp, pattern)) if os.path.isdir(d))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
