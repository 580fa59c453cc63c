# A recording block device for the power-loss test (tests/power.rs): an
# nbdkit Python plugin serving a disk held in memory, started from the
# image `base=`, that appends every write, zero, trim and flush it is asked
# for, in the order it is asked, to the log `log=`.
#
# Log records (little-endian): kind u8 | offset u64 | length u32, then for a
# write `length` bytes of data. Kinds: 1 write, 2 flush, 3 zero (trim is
# recorded as zero: what it reads back as). A write or zero with FUA is
# followed by a flush record. The log file is flushed to the OS at every
# flush record, before the flush is answered, so a reader that sees an
# acknowledgement made after a flush finds that flush in the log.
import builtins
import struct

import nbdkit

API_VERSION = 2

WRITE, FLUSH, ZERO = 1, 2, 3

base = None
log = None
disk = None
logf = None


def config(key, value):
    global base, log
    if key == "base":
        base = value
    elif key == "log":
        log = value
    else:
        raise RuntimeError("unknown parameter " + key)


def config_complete():
    global disk, logf
    if base is None or log is None:
        raise RuntimeError("base= and log= are required")
    with builtins.open(base, "rb") as f:
        disk = bytearray(f.read())
    logf = builtins.open(log, "wb", buffering=1 << 20)


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_multi_conn(h):
    return False


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def _flush_record():
    logf.write(struct.pack("<BQI", FLUSH, 0, 0))
    logf.flush()


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf
    logf.write(struct.pack("<BQI", WRITE, offset, len(buf)))
    logf.write(buf)
    if flags & nbdkit.FLAG_FUA:
        _flush_record()


def zero(h, count, offset, flags):
    disk[offset:offset + count] = bytes(count)
    logf.write(struct.pack("<BQI", ZERO, offset, count))
    if flags & nbdkit.FLAG_FUA:
        _flush_record()


def trim(h, count, offset, flags):
    zero(h, count, offset, flags)


def flush(h, flags):
    _flush_record()
