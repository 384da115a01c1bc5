"""A separate process that owns device memory and exports it with CUDA IPC, as a
tritonclient user's process does (a handle cannot be opened by the process that made
it). Driven over stdin, one command a line, each answered with one line:

    alloc SIZE           -> ID HANDLE (the cudaIpcMemHandle_t's bytes, hex)
    write ID OFFSET HEX  -> ok
    read ID OFFSET N     -> HEX
    free ID              -> ok

Only the CUDA driver (ctypes): no torch, so it starts fast."""

from __future__ import annotations

import ctypes
import sys

DEVICE = int(sys.argv[1]) if len(sys.argv) > 1 else 0


def main() -> None:
    cuda = ctypes.CDLL("libcuda.so.1")

    def call(name: str, *args: object) -> None:
        result = getattr(cuda, name)(*args)
        if result != 0:
            raise RuntimeError(f"{name} failed: CUresult {result}")

    call("cuInit", 0)
    device, context = ctypes.c_int(), ctypes.c_void_p()
    call("cuDeviceGet", ctypes.byref(device), DEVICE)
    call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
    call("cuCtxPushCurrent_v2", context)
    made: dict[int, ctypes.c_uint64] = {}
    for line in sys.stdin:
        command, *args = line.split()
        if command == "alloc":
            pointer, handle = ctypes.c_uint64(), (ctypes.c_ubyte * 64)()
            call("cuMemAlloc_v2", ctypes.byref(pointer), ctypes.c_size_t(int(args[0])))
            call("cuIpcGetMemHandle", ctypes.byref(handle), pointer)
            made[len(made)] = pointer
            answer = f"{len(made) - 1} {bytes(handle).hex()}"
        elif command == "write":
            data = bytes.fromhex(args[2])
            target = ctypes.c_uint64(made[int(args[0])].value + int(args[1]))
            call("cuMemcpyHtoD_v2", target, data, ctypes.c_size_t(len(data)))
            answer = "ok"
        elif command == "read":
            out = ctypes.create_string_buffer(int(args[2]))
            source = ctypes.c_uint64(made[int(args[0])].value + int(args[1]))
            call("cuMemcpyDtoH_v2", out, source, ctypes.c_size_t(int(args[2])))
            answer = out.raw.hex()
        elif command == "free":
            call("cuMemFree_v2", made.pop(int(args[0])))
            answer = "ok"
        else:
            answer = f"unknown command {command}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
