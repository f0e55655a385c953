/* Prints SUPERVISOR-GUEST-UP on COM1, then idles forever (interrupts are off: hlt parks the vCPU). */
.intel_syntax noprefix
.code64
.globl _start
_start:
    lea rsi, [rip + marker]
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  hlt
    jmp 2b
marker:
    .asciz "SUPERVISOR-GUEST-UP\n"
