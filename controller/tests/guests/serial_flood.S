/* Prints FLOOD-START, then writes lines of 'F' to COM1 until stopped: a guest filling its console log. */
.intel_syntax noprefix
.code64
.globl _start
_start:
    mov dx, 0x3f8
    lea rsi, [rip + marker]
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov ecx, 63
    mov al, 'F'
3:  out dx, al
    loop 3b
    mov al, 10
    out dx, al
    jmp 2b
marker:
    .asciz "FLOOD-START\n"
