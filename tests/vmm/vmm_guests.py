"""Tiny freestanding test guests, assembled with the system binutils into flat binaries.

Raw long-mode guests start at 0x100000 in 64-bit mode with the first 4 GiB identity-mapped,
interrupts off and no IDT (see the VMM's raw boot mode).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

LOAD_ADDR = 0x100000
SERIAL = 0x3F8
POWER_OFF = 0x501

# Where tests and guests exchange data.
PARAMS = 0x300000  # host -> guest
RESULTS = 0x300100  # guest -> host

PRELUDE = """
.intel_syntax noprefix
.code64
.globl _start
.text
_start:
"""


def _power_off(code: int) -> str:
    return f"""
    mov dx, {POWER_OFF}
    mov eax, {code}
    out dx, eax
9:  hlt
    jmp 9b
"""


def _print(label: str, text: str) -> str:
    """Writes `text` to COM1 byte by byte (no string instructions: they are slow to emulate)."""
    data = ", ".join(str(b) for b in text.encode())
    return f"""
    lea rsi, [rip + {label}]
    mov dx, {SERIAL}
1:  mov al, byte ptr [rsi]
    test al, al
    jz 2f
    out dx, al
    inc rsi
    jmp 1b
2:
    jmp 3f
{label}: .byte {data}, 0
3:
"""


HELLO = PRELUDE + _print("msg", "hello from the guest\n") + _power_off(42)

# Writes a pattern to RAM, waits for the host to set PARAMS+0 (via write_memory), then copies
# the 8 bytes the host left at PARAMS+8 to RESULTS and powers off with code 7.
MEMORY = (
    PRELUDE
    + f"""
    mov rdi, 0x200000
    mov rax, 0x1122334455667788
    mov qword ptr [rdi], rax
    mov r15, {PARAMS}
4:  mov rax, qword ptr [r15]
    test rax, rax
    jz 4b
    mov rax, qword ptr [r15 + 8]
    mov qword ptr [r15 + 0x100], rax
"""
    + _power_off(7)
)

# Writes to and reads from an address where no RAM and no device is, then reports the value read.
MMIO_HOLE = (
    PRELUDE
    + f"""
    mov rdi, 0xe0000000
    mov dword ptr [rdi], 0x12345678
    mov eax, dword ptr [rdi + 4]
    mov r15, {RESULTS}
    mov dword ptr [r15], eax
    mov rdi, 0xd0000800
    mov dword ptr [rdi], 1
"""
    + _print("m", "survived\n")
    + _power_off(0)
)

I8042_RESET = PRELUDE + _print("r", "resetting\n") + "    mov al, 0xfe\n    out 0x64, al\n5: hlt\n jmp 5b\n"

# No IDT (limit 0): the divide error cannot be delivered, so it becomes a double fault and then a
# triple fault.
TRIPLE_FAULT = PRELUDE + "    xor ecx, ecx\n    xor edx, edx\n    mov eax, 1\n    div ecx\n    hlt\n"

# Interrupts off, halted for good: the VM neither ends nor burns CPU.
CLI_HLT = PRELUDE + "    cli\n6:  hlt\n    jmp 6b\n"

# Increments a counter at RESULTS forever.
COUNTER = PRELUDE + f"    mov rdi, {RESULTS}\n7:  inc qword ptr [rdi]\n    jmp 7b\n"

# A tiny virtio-mmio driver. The host writes the descriptors and the available ring into guest
# RAM, then the parameters, then sets PARAMS+0 ("go"). Parameters (PARAMS + offset):
#   0x08 mmio base, 0x10 queue size (u32), 0x18 descriptor table, 0x20 available ring,
#   0x28 used ring, 0x30 driver features low (u32), 0x34 driver features high (u32),
#   0x38 number of bogus register accesses to make first (u32)
# Results (RESULTS + offset): 0x08 status after DRIVER_OK and notify, 0x10 interrupt status,
#   0x18 magic value read, 0x00 = 1 when done. Powers off with code 0.
VIRTIO_DRIVER = (
    PRELUDE
    + f"""
    mov r15, {PARAMS}
10: mov rax, qword ptr [r15]
    test rax, rax
    jz 10b
    mov rbx, qword ptr [r15 + 0x08]
    mov eax, dword ptr [rbx]
    mov dword ptr [r15 + 0x118], eax
    mov ecx, dword ptr [r15 + 0x38]
    test ecx, ecx
    jz 12f
    /* bogus accesses: odd offsets, byte and word widths, config space past its end */
11: mov byte ptr [rbx + 0x3], 0xff
    mov word ptr [rbx + 0x72], 0xffff
    mov dword ptr [rbx + 0xffc], 0xffffffff
    mov eax, dword ptr [rbx + 0xff8]
    mov al, byte ptr [rbx + 0x101]
    mov dword ptr [rbx + 0x50], 0x7fffffff
    mov dword ptr [rbx + 0x30], 0xffffffff
    mov dword ptr [rbx + 0x38], 0xffffffff
    dec ecx
    jnz 11b
12: mov dword ptr [rbx + 0x70], 0
    mov dword ptr [rbx + 0x70], 1
    mov dword ptr [rbx + 0x70], 3
    mov dword ptr [rbx + 0x24], 1
    mov eax, dword ptr [r15 + 0x34]
    mov dword ptr [rbx + 0x20], eax
    mov dword ptr [rbx + 0x24], 0
    mov eax, dword ptr [r15 + 0x30]
    mov dword ptr [rbx + 0x20], eax
    mov dword ptr [rbx + 0x70], 11
    mov dword ptr [rbx + 0x30], 0
    mov eax, dword ptr [r15 + 0x10]
    mov dword ptr [rbx + 0x38], eax
    mov rax, qword ptr [r15 + 0x18]
    mov dword ptr [rbx + 0x80], eax
    shr rax, 32
    mov dword ptr [rbx + 0x84], eax
    mov rax, qword ptr [r15 + 0x20]
    mov dword ptr [rbx + 0x90], eax
    shr rax, 32
    mov dword ptr [rbx + 0x94], eax
    mov rax, qword ptr [r15 + 0x28]
    mov dword ptr [rbx + 0xa0], eax
    shr rax, 32
    mov dword ptr [rbx + 0xa4], eax
    mov dword ptr [rbx + 0x44], 1
    mov dword ptr [rbx + 0x70], 15
    mov dword ptr [rbx + 0x50], 0
    mov eax, dword ptr [rbx + 0x70]
    mov dword ptr [r15 + 0x108], eax
    mov eax, dword ptr [rbx + 0x60]
    mov dword ptr [r15 + 0x110], eax
    mov dword ptr [rbx + 0x64], eax
    mov qword ptr [r15 + 0x100], 1
"""
    + _print("v", "virtio done\n")
    + _power_off(0)
)

# A doorbell-driven virtio-mmio driver for three queues: the guest only sets the device up and
# turns host "doorbell rings" into queue notifications, so the test can play the driver's part in
# guest RAM. Parameters (PARAMS + offset): 0x08 mmio base, 0x10 queue size (u32),
# 0x18 + 0x18 * q: descriptor table, available ring, used ring of queue q (q = 0, 1, 2),
# 0x80 doorbell (u32, bump to notify; 0xffffffff powers off), 0x88 queue to notify (u32).
# Results: 0x100 = 1 once set up, 0x108 device status after DRIVER_OK, 0x110 last doorbell seen.
VIRTIO_DOORBELL = (
    PRELUDE
    + f"""
    mov r15, {PARAMS}
20: mov rax, qword ptr [r15]
    test rax, rax
    jz 20b
    mov rbx, qword ptr [r15 + 0x08]
    mov dword ptr [rbx + 0x70], 0
    mov dword ptr [rbx + 0x70], 1
    mov dword ptr [rbx + 0x70], 3
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1
    mov dword ptr [rbx + 0x24], 0
    mov dword ptr [rbx + 0x20], 0
    mov dword ptr [rbx + 0x70], 11
    xor ecx, ecx
    lea rsi, [r15 + 0x18]
21: mov dword ptr [rbx + 0x30], ecx
    mov eax, dword ptr [r15 + 0x10]
    mov dword ptr [rbx + 0x38], eax
    mov rax, qword ptr [rsi]
    mov dword ptr [rbx + 0x80], eax
    shr rax, 32
    mov dword ptr [rbx + 0x84], eax
    mov rax, qword ptr [rsi + 8]
    mov dword ptr [rbx + 0x90], eax
    shr rax, 32
    mov dword ptr [rbx + 0x94], eax
    mov rax, qword ptr [rsi + 16]
    mov dword ptr [rbx + 0xa0], eax
    shr rax, 32
    mov dword ptr [rbx + 0xa4], eax
    mov dword ptr [rbx + 0x44], 1
    add rsi, 0x18
    inc ecx
    cmp ecx, 3
    jne 21b
    mov dword ptr [rbx + 0x70], 15
    mov eax, dword ptr [rbx + 0x70]
    mov dword ptr [r15 + 0x108], eax
    mov qword ptr [r15 + 0x100], 1
    xor r14d, r14d
22: mov eax, dword ptr [r15 + 0x80]
    cmp eax, r14d
    je 22b
    mov r14d, eax
    cmp eax, 0xffffffff
    je 23f
    mov eax, dword ptr [r15 + 0x88]
    mov dword ptr [rbx + 0x50], eax
    mov eax, dword ptr [rbx + 0x60]
    mov dword ptr [rbx + 0x64], eax
    mov eax, dword ptr [rbx + 0x70]
    mov dword ptr [r15 + 0x108], eax
    mov dword ptr [r15 + 0x110], r14d
    jmp 22b
23:
"""
    + _power_off(0)
)

REAL_MODE = """
.intel_syntax noprefix
.code16
.globl _start
.text
_start:
    mov dx, 0x3f8
    mov al, 'R'
    out dx, al
    mov al, 10
    out dx, al
    mov dx, 0x501
    mov al, 5
    out dx, al
1:  hlt
    jmp 1b
"""


# The application processors' meeting point: each one, started in real mode by the SIPI below,
# adds one to this counter (below 1 MiB, as real-mode code must address it).
AP_COUNTER = 0x9000
AP_TRAMPOLINE = 0x8000  # SIPI vector 8

# Reads the MP table the VMM wrote at 0x9fc00 (floating pointer "_MP_", then the "PCMP" table)
# and counts its processor entries into RESULTS; broadcasts INIT and one SIPI (vector 8) to every
# other local APIC, and waits until that many minus one have counted themselves in at
# AP_COUNTER. Powers off with code 0x40 + processors. Any other code: 1 = no floating pointer,
# 2 = no configuration table. With a missing AP it never powers off.
SMP = (
    PRELUDE
    + f"""
    mov rdi, {AP_TRAMPOLINE}
    lea rsi, [rip + ap_start]
    lea rcx, [rip + ap_end]
    sub rcx, rsi
5:  mov al, byte ptr [rsi]
    mov byte ptr [rdi], al
    inc rsi
    inc rdi
    dec rcx
    jnz 5b
    mov dword ptr [{AP_COUNTER}], 0
    mov rsi, 0x9fc00
    mov r9, 1
    cmp dword ptr [rsi], 0x5f504d5f
    jne 8f
    mov esi, dword ptr [rsi + 4]
    mov r9, 2
    cmp dword ptr [rsi], 0x504d4350
    jne 8f
    movzx ecx, word ptr [rsi + 34]
    lea rdx, [rsi + 44]
    xor r8, r8
6:  cmp byte ptr [rdx], 0
    jne 7f
    inc r8
    add rdx, 12
7:  add rdx, 8
    dec ecx
    jnz 6b
    mov qword ptr [{RESULTS}], r8
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov dword ptr [rbx + 0x300], 0xc4500
    mov dword ptr [rbx + 0x300], 0xc4608
    lea r9, [r8 - 1]
4:  mov eax, dword ptr [{AP_COUNTER}]
    cmp rax, r9
    jne 4b
    lea r9, [r8 + 0x40]
8:  mov dx, {POWER_OFF}
    mov eax, r9d
    out dx, eax
9:  hlt
    jmp 9b
.code16
ap_start:
    cli
    xor ax, ax
    mov ds, ax
    lock inc dword ptr [{AP_COUNTER}]
3:  hlt
    jmp 3b
ap_end:
.code64
"""
)


def build(source: str, workdir: Path, *, load_addr: int = LOAD_ADDR, elf: bool = False) -> Path:
    """Assembles `source` linked at `load_addr`; returns the flat binary (or the ELF)."""
    key = hashlib.sha256(f"{source}{load_addr}".encode()).hexdigest()[:12]
    out = workdir / f"guest-{key}.{'elf' if elf else 'bin'}"
    if out.exists():
        return out
    src = workdir / f"guest-{key}.S"
    obj = workdir / f"guest-{key}.o"
    exe = workdir / f"guest-{key}.elf"
    src.write_text(source)
    r = subprocess.run(["as", "--64", "-o", str(obj), str(src)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"assembling the test guest failed: {r.stderr.strip()}")
    link = ["ld", "-m", "elf_x86_64", "-nostdlib", f"-Ttext={load_addr:#x}", "-e", "_start"]
    subprocess.run([*link, "-o", str(exe), str(obj)], check=True, capture_output=True, text=True)
    if elf:
        return exe
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(exe), str(out)], check=True)
    return out
