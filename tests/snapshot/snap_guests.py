"""Freestanding guests for the snapshot tests, assembled with binutils into flat binaries.

They start in 64-bit mode at 0x100000 (the VMM's raw long-mode boot: the first 4 GiB
identity-mapped, interrupts off) and talk to the test through two RAM mailboxes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The VMM tests' guest toolkit: the same load address, mailboxes and assembler pipeline.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))
from vmm_guests import LOAD_ADDR, PARAMS, RESULTS, build

__all__ = ["CLONE", "COUNTER", "LOAD_ADDR", "PARAMS", "RESULTS", "VIRTIO_ONE_QUEUE", "build"]

_HEAD = """
.intel_syntax noprefix
.code64
.globl _start
.text
_start:
"""


def _out_char(ch: str) -> str:
    return f"    mov dx, 0x3f8\n    mov al, {ord(ch)}\n    out dx, al\n"


def _out_text(text: str) -> str:
    return "".join(_out_char(c) for c in text)


# Counts at RESULTS forever.
COUNTER = _HEAD + f"    mov rdi, {RESULTS}\n1:  inc qword ptr [rdi]\n    jmp 1b\n"

# Prints "up\n", then counts at RESULTS until the host writes a clone id N (non-zero) to PARAMS.
# Then it writes N * 0x0101010101010101 to RESULTS + 8, fills the 64 KiB at 0x400000 with the low
# byte of N, prints "clone N\n" (N < 10) and powers off with code N.
CLONE = (
    _HEAD
    + _out_text("up\n")
    + f"""
    mov r15, {PARAMS}
    mov r14, {RESULTS}
1:  inc qword ptr [r14]
    mov rax, qword ptr [r15]
    test rax, rax
    jz 1b
    mov rbx, rax
    mov rcx, 0x0101010101010101
    imul rax, rcx
    mov qword ptr [r14 + 8], rax
    mov rdi, 0x400000
    mov ecx, 0x10000
2:  mov byte ptr [rdi], bl
    inc rdi
    dec ecx
    jnz 2b
"""
    + _out_text("clone ")
    + """
    mov dx, 0x3f8
    mov al, bl
    add al, 48
    out dx, al
    mov al, 10
    out dx, al
    mov dx, 0x501
    mov eax, ebx
    out dx, eax
3:  hlt
    jmp 3b
"""
)

# A one-queue virtio driver for the first virtio-mmio device (0xd0000000). It negotiates
# VERSION_1 only, sets queue 0 up from PARAMS (0x10 size, 0x18 descriptor table, 0x20 available
# ring, 0x28 used ring), sets DRIVER_OK and writes 1 to RESULTS. Then each time the host bumps the
# doorbell at PARAMS + 0x80 it notifies queue 0, acknowledges the interrupt and copies the
# doorbell to RESULTS + 0x10; 0xffffffff powers off with code 0.
VIRTIO_ONE_QUEUE = (
    _HEAD
    + f"""
    mov r15, {PARAMS}
1:  mov rax, qword ptr [r15]
    test rax, rax
    jz 1b
    mov rbx, 0xd0000000
    mov dword ptr [rbx + 0x70], 0
    mov dword ptr [rbx + 0x70], 1
    mov dword ptr [rbx + 0x70], 3
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1
    mov dword ptr [rbx + 0x24], 0
    mov dword ptr [rbx + 0x20], 0
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
    mov qword ptr [r15 + 0x100], 1
    xor r14d, r14d
2:  mov eax, dword ptr [r15 + 0x80]
    cmp eax, r14d
    je 2b
    mov r14d, eax
    cmp eax, 0xffffffff
    je 3f
    mov dword ptr [rbx + 0x50], 0
    mov eax, dword ptr [rbx + 0x60]
    mov dword ptr [rbx + 0x64], eax
    mov dword ptr [r15 + 0x110], r14d
    jmp 2b
3:  mov dx, 0x501
    xor eax, eax
    out dx, eax
4:  hlt
    jmp 4b
"""
)
