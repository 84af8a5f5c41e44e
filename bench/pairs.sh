# Timing helpers shared by bench/run.sh, bench/family.sh and bench/scaling.sh (source it).
#
# One run (`run_once`): outputs deleted, `sync` (so the last run's dirty pages are not flushed
# during this one), the input read once to /dev/null (page cache warm), then the command timed
# with a nanosecond clock around `/usr/bin/time -f '%M %U %S'` (peak RSS, and user + system CPU
# seconds; its own %e has only 10 ms resolution, too coarse for `cp`).
#
# Paired runs (`measure_pairs`): on a shared or virtual machine the speed of the disk and the
# CPU moves by ±50 % over seconds, so "median of cp runs, then median of convert runs" compares
# two different machines. Instead the baseline and the command run back to back, PAIRS times,
# alternating which goes first, and the figure is the median of the per-pair ratios: a slow
# stretch slows both halves of a pair and cancels out of its ratio. The CPU-time ratio (user +
# system, all threads) is printed beside it: on a machine whose other tenants keep both cores
# busy it moves much less than wall time, and says whether a change of the wall ratio is ours.
#
# Needs: WORK (scratch dir) set by the caller.

# median: numbers on stdin, one a line → the median, 3 decimals (4 with MEDIAN_DIGITS=4).
median() {
    sort -g | awk -v d="${MEDIAN_DIGITS:-3}" '{a[NR]=$1} END{
        if (NR == 0) exit 1;
        m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.*f", d, m }'
}

# run_once WARM LOG CLEANUP_FILES... -- CMD ARGS...
# Runs CMD once as described above; prints "wall_s rss_mb cpu_s". On failure prints CMD's output to
# stderr and returns 1.
run_once() {
    local warm="$1" lf="$2"; shift 2
    local cleanup=()
    while [[ "$1" != "--" ]]; do [[ "$1" == "-" ]] || cleanup+=("$1"); shift; done
    shift
    local tf="$lf.time" t0 t1 rc
    ((${#cleanup[@]} == 0)) || rm -f "${cleanup[@]}"
    sync
    cat "$warm" >/dev/null
    t0=$(date +%s%N)
    set +e
    /usr/bin/time -f '%M %U %S' -o "$tf" "$@" >"$lf" 2>&1
    rc=$?
    set -e
    t1=$(date +%s%N)
    if [[ $rc -ne 0 ]]; then
        echo "bench: error: '$*' exited $rc; its output:" >&2
        cat "$lf" >&2
        return 1
    fi
    tail -n 1 "$tf" | awk -v a="$t0" -v b="$t1" '{printf "%.4f %.1f %.2f\n", (b-a)/1e9, $1*1024/1e6, $2+$3}'
    rm -f "$tf"
}

# measure_pairs PAIRS WARM BASE_OUT CMD_OUT -- BASE CMD... -- CMD CMD...
# BASE_OUT / CMD_OUT: the file each writes (must be non-empty afterwards; deleted before each
# run and at the end; the report beside CMD_OUT is deleted too). Prints one line:
#   "ratio_median ratio_min ratio_max base_s_median cmd_s_median base_mb_median cmd_mb_median
#    cpu_ratio_median"   (the last: median of per-pair ratios of CPU seconds; "nan" if cp used < 10 ms)
# and logs each pair to stderr. The last run's output stays in $WORK/.log.base / .log.cmd.
measure_pairs() {
    local pairs="$1" warm="$2" bout="$3" cout="$4"; shift 5
    local base=() cmd=()
    while [[ "$1" != "--" ]]; do base+=("$1"); shift; done
    shift
    cmd=("$@")
    local crep="-" i r bt bm bc ct cm cc cr
    [[ "$cout" == "-" ]] || crep="${cout%.*}.report.json"
    local ratios="" bts="" cts="" bms="" cms="" cpus=""
    for ((i = 1; i <= pairs; i++)); do
        if ((i % 2)); then
            read -r bt bm bc < <(run_once "$warm" "$WORK/.log.base" "$bout" -- "${base[@]}") || return 1
            read -r ct cm cc < <(run_once "$warm" "$WORK/.log.cmd" "$cout" "$crep" -- "${cmd[@]}") || return 1
        else
            read -r ct cm cc < <(run_once "$warm" "$WORK/.log.cmd" "$cout" "$crep" -- "${cmd[@]}") || return 1
            read -r bt bm bc < <(run_once "$warm" "$WORK/.log.base" "$bout" -- "${base[@]}") || return 1
        fi
        [[ -z "$bt" || -z "$ct" ]] && { echo "bench: error: a run of the pair failed" >&2; return 1; }
        [[ "$bout" == "-" || -s "$bout" ]] || { echo "bench: error: ${base[*]} wrote no $bout" >&2; return 1; }
        [[ "$cout" == "-" || -s "$cout" ]] || { echo "bench: error: ${cmd[*]} wrote no $cout" >&2; return 1; }
        r=$(awk -v a="$ct" -v b="$bt" 'BEGIN{printf "%.4f", a/b}')
        cr=$(awk -v a="$cc" -v b="$bc" 'BEGIN{ if (b >= 0.01) printf "%.4f", a/b; else print "nan" }')
        echo "bench:   pair $i: base $bt s (cpu $bc), cmd $ct s (cpu $cc, $cm MB), ratio $r, cpu ratio $cr" >&2
        ratios+="$r"$'\n'; bts+="$bt"$'\n'; cts+="$ct"$'\n'; bms+="$bm"$'\n'; cms+="$cm"$'\n'
        [[ "$cr" == nan ]] || cpus+="$cr"$'\n'
    done
    [[ "$bout" == "-" ]] || rm -f "$bout"
    [[ "$cout" == "-" ]] || rm -f "$cout" "$crep"
    local rmin rmax
    rmin=$(printf '%s' "$ratios" | sort -g | head -n 1)
    rmax=$(printf '%s' "$ratios" | sort -g | tail -n 1)
    echo "$(printf '%s' "$ratios" | median) $rmin $rmax $(printf '%s' "$bts" | median) \
$(printf '%s' "$cts" | median) $(printf '%s' "$bms" | MEDIAN_DIGITS=1 median) $(printf '%s' "$cms" | MEDIAN_DIGITS=1 median) \
$(printf '%s' "$cpus" | MEDIAN_DIGITS=2 median || echo nan)"
}
