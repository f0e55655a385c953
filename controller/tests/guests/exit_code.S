/* Prints SUPERVISOR-GUEST-EXIT on COM1, then powers off through the ignite power port with code 42. */
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
2:  mov dx, 0xf4
    mov al, 42
    out dx, al
3:  hlt
    jmp 3b
marker:
    .asciz "SUPERVISOR-GUEST-EXIT\n"
