# Sourced by the GPU scripts (OUT set): reuse Triton's cache carried from an earlier call in
# .gpu_cache (git-ignored; copy the returned files there): FLA's autotune results (autotune.tgz:
# minutes per new shape) and the compiled kernels (triton_cache.tgz: a cold start compiles ours for
# ~100 s; Triton's cache keys hold each kernel's source, so a changed kernel is compiled again).
# Both go back in $OUT when the script exits, the compiled kernels as their cubins and metadata only
# (a cache hit loads nothing else; the IR files are ~7/8 of the bytes and took the archive past the
# 16 MiB a returned file may have), and unless CACHE_BACK=0 (a call returns at most 8 files: set it
# on all but one of several runs in one call).
mkdir -p ~/.triton
for f in autotune triton_cache; do
  if [ -f .gpu_cache/$f.tgz ]; then tar -xzf .gpu_cache/$f.tgz -C ~/.triton; fi
done
trap '(cd ~/.triton && find cache -name "*.autotune.json" | tar -czf "$OUT/autotune.tgz" -T - \
  && [ "${CACHE_BACK:-1}" = 1 ] && tar -czf "$OUT/triton_cache.tgz" --exclude="*.llir" --exclude="*.ptx" \
     --exclude="*.source" --exclude="*.ttgir" --exclude="*.ttir" cache && [ $(stat -c %s "$OUT/triton_cache.tgz") -lt 16000000 ] \
  || rm -f "$OUT/triton_cache.tgz")' EXIT
