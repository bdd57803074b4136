# Sourced by ab.sh and store-ab.sh: two sides measured in interleaved pairs, and their medians.
# The sourcing script defines `cell SIDE PAIR`, which runs one pass of a side and appends
# "variant<TAB>side<TAB>pair<TAB>cpu[<TAB>more columns]" lines to its results file.

# Runs PAIRS pairs of SIDE_A and SIDE_B: A then B in odd pairs, B then A in even ones, so
# drift in the machine's load falls on both sides alike.
alternate() { # pairs side_a side_b
    local pair
    for pair in $(seq 1 "$1"); do
        if [ $((pair % 2)) = 1 ]; then cell "$2" "$pair"; cell "$3" "$pair"; else cell "$3" "$pair"; cell "$2" "$pair"; fi
    done
}

median() { # numbers on stdin -> their median
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

side_median() { # results variant side [column, default 4] -> the median of that column
    awk -F'\t' -v v="$2" -v s="$3" -v c="${4:-4}" '$1 == v && $2 == s { print $c }' "$1" | median
}

pair_list() { # results variant side_a side_b -> "a1/b1, a2/b2, ..." (CPU column)
    awk -F'\t' -v v="$2" -v a="$3" -v b="$4" '$1 == v { c[$3 "\t" $2] = $4; if ($3 > m) m = $3 }
        END { for (p = 1; p <= m; p++) printf "%s%s/%s", (p > 1 ? ", " : ""), c[p "\t" a], c[p "\t" b] }' "$1"
}
