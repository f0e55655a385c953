/* For the snapshot tests: starts the virtio-vsock device in slot 0 (three 8-entry queues), posts one
   4-byte buffer on its event queue, then counts like the counter guests ("count n" each step, r12).
   When the device uses the event buffer it checks the event is a transport reset (id 0), prints
   "transport reset" and powers off with 0. Exit codes: 1x handshake, 5 another event, 6 LIMIT reached
   without an event. */
.equ BASE, 0xd0000000
.equ QUEUES, 0x200000        /* queue q: descriptors at QUEUES + q * 0x10000, avail +0x1000, used +0x2000 */
.equ EVENT_USED_IDX, 0x222002
.equ EVBUF, 0x230000

.macro reg_write off, val
    mov dword ptr [rbx + \off], \val
.endm

.global _start
_start:
    mov ebx, BASE
    cmp dword ptr [rbx + 0x08], 19           /* DeviceID: vsock */
    je 1f
    power_off 10
1:  reg_write 0x70, 0
    reg_write 0x70, 1
    reg_write 0x70, 3
    reg_write 0x24, 1
    reg_write 0x20, 1                         /* VERSION_1 only */
    reg_write 0x24, 0
    reg_write 0x20, 0
    reg_write 0x70, 0xb
    test dword ptr [rbx + 0x70], 8
    jnz 1f
    power_off 14
1:  xor ecx, ecx
2:  mov dword ptr [rbx + 0x30], ecx          /* QueueSel */
    reg_write 0x38, 8
    mov eax, ecx
    shl eax, 16
    add eax, QUEUES
    mov dword ptr [rbx + 0x80], eax
    reg_write 0x84, 0
    add eax, 0x1000
    mov dword ptr [rbx + 0x90], eax
    reg_write 0x94, 0
    add eax, 0x1000
    mov dword ptr [rbx + 0xa0], eax
    reg_write 0xa4, 0
    reg_write 0x44, 1
    inc ecx
    cmp ecx, 3
    jne 2b
    reg_write 0x70, 0xf
    test dword ptr [rbx + 0x70], 0x40
    jz 1f
    power_off 16
1:  mov dword ptr [EVBUF], 0xffffffff
    mov qword ptr [QUEUES + 0x20000], EVBUF   /* event queue descriptor 0: 4 device-writable bytes */
    mov dword ptr [QUEUES + 0x20000 + 8], 4
    mov word ptr [QUEUES + 0x20000 + 12], 2
    mov word ptr [QUEUES + 0x21000 + 4], 0
    mfence
    mov word ptr [QUEUES + 0x21000 + 2], 1
    mfence
    reg_write 0x50, 2
    xor r12, r12

next:
    cmp word ptr [EVENT_USED_IDX], 1
    jne 3f
    cmp dword ptr [EVBUF], 0
    je 2f
    power_off 5
2:  print reset
    power_off 0
3:  inc r12
    print prefix
    mov r8, r12
    mov ecx, 16
5:  rol r8, 4
    mov al, r8b
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe 6f
    add al, 7
6:  out dx, al
    dec ecx
    jnz 5b
    mov al, 10
    out dx, al
    mov ecx, 150000
7:  loop 7b
    cmp r12, LIMIT
    jne next
    power_off 6
prefix: .asciz "count "
reset: .asciz "transport reset\n"
