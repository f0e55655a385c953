/* Counts in r12 and at 0x6000, checks before each step that both agree, and prints
 * "COUNT <16 hex digits>" on COM1 a few times a second until stopped. A snapshot restored into a
 * new VMM continues the count where it was saved; a mismatch (memory and registers restored from
 * different points) prints COUNT-MISMATCH and halts. */
.intel_syntax noprefix
.code64
.globl _start
_start:
    lea rsp, [rip + stack_top]
    xor r12, r12
    mov qword ptr [0x6000], 0
    mov dx, 0x3f8
next:
    cmp qword ptr [0x6000], r12
    jne mismatch
    inc r12
    mov qword ptr [0x6000], r12
    lea rsi, [rip + prefix]
    call print
    mov rbx, r12
    mov ecx, 16
1:  rol rbx, 4
    mov al, bl
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe 2f
    add al, 7
2:  out dx, al
    dec ecx
    jnz 1b
    mov al, 10
    out dx, al
    mov ecx, 150000
3:  loop 3b
    jmp next
mismatch:
    lea rsi, [rip + bad]
    call print
4:  hlt
    jmp 4b
print:
    lodsb
    test al, al
    jz 5f
    out dx, al
    jmp print
5:  ret
prefix:
    .asciz "COUNT "
bad:
    .asciz "COUNT-MISMATCH\n"
    .balign 16
    .skip 256
stack_top:
