/* Prelude of every tiny test guest: the VMM enters _start in 64-bit mode with the first 4 GiB
   identity-mapped, interrupts off. */
.intel_syntax noprefix
.code64

/* Ends the VM through the ignite power-control port with exit code \code. */
.macro power_off code
    mov dx, 0xf4
    mov al, \code
    out dx, al
99: hlt
    jmp 99b
.endm

/* Writes the NUL-terminated string at \label to COM1. Clobbers rsi, rdx, rax. */
.macro print label
    lea rsi, [rip + \label]
    mov dx, 0x3f8
98: lodsb
    test al, al
    jz 97f
    out dx, al
    jmp 98b
97:
.endm
