# Sourced by the scripts: picks the Python that IMServer's virtual environment is made with.

pick_python() {
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "IMServer needs Python >= 3.11 (none found on PATH)" >&2
    return 1
}
